"""A pruned model ready to answer requests: weights, preprocessing and class names of one job.

``InferenceModel.load(output_dir)`` reads what a job wrote (``metrics.json`` and the compact
artifact, or the dense file when there is none) and nothing else: the dataset is not needed, the
eval transform is rebuilt from its name. Serving replicas, ``dg2pf predict --local`` and the tests'
in-process reference all go through this one class, so they cannot disagree on preprocessing.
Every problem with a request's data is an ``InputError`` naming what was expected.

The logits come from ``model``, a PyTorch module: the job's architecture by default, or another
engine wrapped as a module (``dg2pf_core.io.onnx_backend`` runs the job's ``model.onnx`` on ONNX
Runtime); ``backend`` names which, and everything else (inputs, top-k, labels) is the same code.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import nn

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import ModelInfo
from dg2pf_core.algorithm.channels import structured
from dg2pf_core.data import DataRequest, eval_transform_for
from dg2pf_core.data.imagecheck import large_images_expected, upright
from dg2pf_core.errors import CheckpointError, InputError
from dg2pf_core.io.checkpoints import load_into, read_state_dict
from dg2pf_core.models import build_model, get_arch, hf

IMAGE_FORMATS = ("PNG", "JPEG")
# Decoded size limit: a small compressed file can expand to gigabytes (a "decompression bomb").
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class Prediction:
    index: int
    label: str | None
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "probability": self.probability}


@dataclass
class InferenceModel:
    model: nn.Module
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one input
    class_names: list[str] | None
    transform: Callable[[PIL.Image.Image], torch.Tensor]
    backend: str = "torch"  # what computes the logits: "torch", or the engine ``model`` wraps
    precision: str = "fp32"  # "int8": the job's model.int8.onnx computes them

    @classmethod
    def load(cls, output_dir: str | Path, device: str | torch.device = "cpu") -> InferenceModel:
        """The model a job wrote to ``output_dir``, in eval mode on ``device``."""
        meta = read_job_metrics(output_dir)
        weights = Artifacts(output_dir).weights
        spec = get_arch(meta.arch, weights)  # a transformers model: its config.json beside the weights
        model = structured(build_model(meta.arch, meta.num_classes, weights), weights, spec.name)  # channels removed
        load_into(model, read_state_dict(weights), arch=f"{meta.arch} with num_classes={meta.num_classes}")
        return cls.for_module(model.to(device).eval(), meta)

    @classmethod
    def for_module(
        cls, module: nn.Module, meta: ModelInfo, backend: str = "torch", precision: str = "fp32"
    ) -> InferenceModel:
        """Logits from ``module`` (``[N, C, H, W]`` float32 -> ``[N, num_classes]``), inputs, labels and
        preprocessing from the job's ``metrics.json`` (``meta``, as ``read_job_metrics`` returns it)."""
        mean, std, interpolation = (getattr(meta, k, None) for k in ("mean", "std", "interpolation"))
        # the job's own record first (metrics.json); the architecture's only for models written before it
        # recorded all (a transformers model always has: its architecture needs its directory)
        recorded = meta.image_size and meta.in_channels and mean and std and interpolation
        crop_known = meta.crop_pct is not None or meta.arch == hf.HF_ARCH
        spec = None if recorded and crop_known else get_arch(meta.arch)
        request = DataRequest(
            image_size=meta.image_size or spec.input_size,
            in_channels=meta.in_channels or spec.in_channels,
            crop_pct=meta.crop_pct if meta.crop_pct is not None or spec is None else spec.crop_pct,
            mean=tuple(mean) if mean else spec.mean,
            std=tuple(std) if std else spec.std,
            interpolation=interpolation or spec.interpolation,
        )
        return cls(
            model=module,
            arch=meta.arch,
            num_classes=meta.num_classes,
            input_shape=(request.in_channels, request.image_size, request.image_size),
            class_names=meta.class_names,
            transform=eval_transform_for(meta.dataset, request),
            backend=backend,
            precision=precision,
        )

    @property
    def device(self) -> torch.device:
        # A module wrapping another engine has no parameters; it takes its inputs on the CPU.
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    # --- inputs -------------------------------------------------------------------------------

    def tensor_inputs(self, inputs: Any) -> torch.Tensor:
        """``{"inputs": [...]}`` -> ``[N, C, H, W]``: a non-empty list of ``C x H x W`` nested lists."""
        if not isinstance(inputs, list) or not inputs:
            raise InputError(f"inputs must be a non-empty list of {self._shape_text()} nested lists of numbers")
        try:
            batch = torch.tensor(inputs, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"inputs must be a rectangular nested list of numbers, each item {self._shape_text()}: {exc}"
            ) from None
        if tuple(batch.shape[1:]) != self.input_shape:
            raise InputError(
                f"each input must have shape {self._shape_text()} (channels x height x width); "
                f"got {len(inputs)} input(s) of shape {' x '.join(map(str, batch.shape[1:])) or 'scalar'}"
            )
        if not torch.isfinite(batch).all():
            raise InputError("inputs contain NaN or infinite values")
        return batch

    def image_input(self, data: bytes) -> torch.Tensor:
        """A PNG/JPEG file's bytes -> ``[C, H, W]`` through the job's eval transform."""
        try:
            with large_images_expected():  # the size is checked below, against our own, lower limit
                image = PIL.Image.open(io.BytesIO(data))
            image_format = image.format
            width, height = image.size
        except PIL.Image.DecompressionBombError as exc:  # a header declaring more pixels than Pillow decodes
            raise InputError(
                f"image is too large: {exc}; at most {MAX_IMAGE_PIXELS} pixels are accepted", field="image"
            ) from None
        except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(
                f"the body is not a readable image ({', '.join(IMAGE_FORMATS)} expected): {exc}", field="image"
            ) from None
        if image_format not in IMAGE_FORMATS:
            raise InputError(f"images must be {' or '.join(IMAGE_FORMATS)}, got {image_format}", field="image")
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(
                f"image is {width} x {height} pixels; at most {MAX_IMAGE_PIXELS} pixels are accepted", field="image"
            )
        try:
            image.load()
            image = upright(image)  # a phone's EXIF orientation, as every viewer shows the photo
            tensor = self.transform(image)
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
            raise InputError(f"the image could not be decoded: {exc}", field="image") from None
        return tensor

    def _shape_text(self) -> str:
        return " x ".join(map(str, self.input_shape))

    # --- outputs ------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.to(self.device)).float().cpu()

    def top_k(self, logits: torch.Tensor, k: int) -> list[list[Prediction]]:
        """The ``k`` most probable classes of each row, most probable first."""
        k = max(1, min(int(k), self.num_classes))
        probs = torch.softmax(logits.float(), dim=1)
        values, indices = probs.topk(k, dim=1)
        return [
            [Prediction(int(i), self._label(int(i)), float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)
        ]

    def _label(self, index: int) -> str | None:
        names = self.class_names
        return names[index] if names is not None and 0 <= index < len(names) else None


def read_job_metrics(output_dir: str | Path) -> ModelInfo:
    """A finished job's ``metrics.json`` (what serving needs of it: ``arch``, ``num_classes``,
    ``dataset``, ...). Raises ``CheckpointError`` naming the directory when it is missing, unreadable
    or not a dg2pf job's."""
    files = Artifacts(output_dir)
    try:
        return ModelInfo.read(files.metrics)
    except OSError as exc:
        raise CheckpointError(
            f"{files.root} holds no readable {files.METRICS} (is it a finished job's output?): {exc.strerror or exc}"
        ) from exc
    except ValueError as exc:  # MetricsError: names the file and what is wrong with it
        raise CheckpointError(str(exc)) from exc


def predictions_json(preds: Sequence[Sequence[Prediction]]) -> list[list[dict[str, Any]]]:
    return [[p.to_dict() for p in row] for row in preds]


def finite_logits(logits: torch.Tensor) -> list[list[float | None]]:
    return [[v if math.isfinite(v) else None for v in row] for row in logits.tolist()]
