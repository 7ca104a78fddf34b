"""``dg2pf quantize``: int8 for a model pruned earlier (or not pruned at all), as a ``precision: int8`` job
makes it after training: ``model.onnx`` exported and checked, ``model.int8.onnx`` kept only within
``max_drop`` points of its validation top-1, and ``quantization.json`` (the job's ``quantization``
section) saying which, in ``out`` (written whole or not at all)."""

from __future__ import annotations

from pathlib import Path

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.options import BOUNDS
from dg2pf_contract.results import Quantization
from dg2pf_core.errors import ConfigError, DG2PFError
from dg2pf_core.io.export import OutputDir
from dg2pf_core.io.onnx_export import export_onnx
from dg2pf_core.job.data import load_data
from dg2pf_core.job.model import load_model
from dg2pf_core.job.results import quantization_section


def quantize_checkpoint(
    arch: str,
    num_classes: int,
    checkpoint: str,
    dataset: str,
    out: str | Path,
    *,
    max_drop: float = 0.5,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad_images: bool = False,
    crop_pct: float | None = None,
    checkpoint_key: str | None = None,
) -> Quantization:
    bounds = BOUNDS["max_quantization_drop"]
    if isinstance(max_drop, bool) or not bounds.contains(max_drop):
        raise ConfigError(
            f"--max-quantization-drop must be points of top-1 in {bounds.text()}, got {max_drop}",
            field="max_quantization_drop",
        )
    output = OutputDir(out)  # absent or empty, writable: checked before anything is loaded
    spec, model = load_model(arch, num_classes, checkpoint, key=checkpoint_key)
    # no augmentation: the training images calibrate the activations as the model will see them served
    splits, size = load_data(
        dataset, spec, num_classes, image_size, val_fraction, seed, skip_bad_images, augment="none", crop_pct=crop_pct
    )
    with output.staging() as tmp:
        files = Artifacts(tmp)
        onnx = export_onnx(model, (spec.in_channels, size, size), files.onnx, what=arch)
        if not onnx.written:
            raise DG2PFError(f"{arch} cannot be quantized: it does not export to ONNX ({onnx.reason})", field="arch")
        section = quantization_section(splits, files, max_drop, 256)
        (tmp / Artifacts.QUANTIZATION).write_text(section.model_dump_json(indent=1) + "\n")
    return section
