"""The job spec: one pydantic type describes a pruning job everywhere (API, CLI, client, engine).

``schedule`` is generated from ``DG2PFConfig``, so every knob of the algorithm is settable here and
the two can never drift apart. Unknown fields are rejected at every level.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from dg2pf_core.config import BOUNDS, KD_LOSSES, MAX_PATTERN_LENGTH, MAX_PATTERNS, PRESET_FIELDS, PRESETS, DG2PFConfig
from dg2pf_core.data.registry import AUGMENT_POLICIES, AUTO
from dg2pf_core.job import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, PruneJob
from dg2pf_core.models.registry import MAX_CLASSES
from dg2pf_core.nm import PATTERN as GRANULARITY_PATTERN


class _Strict(BaseModel):
    # Infinity/NaN are refused (JSON stores them as null, and a job built from null cannot run).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# C0 controls (NUL, ESC, CR, LF, ...), DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _no_control(value: str) -> str:
    # A NUL byte cannot be part of a file name: refused here, not by the operating system later. The
    # others rewrite a terminal or a log line when the CLI or the service prints the value (an ANSI
    # escape, a CR that overprints a line, a LF that forges one).
    found = _CONTROL.search(value)
    if found:
        raise ValueError(f"must not contain control characters (NUL, escape, CR, LF, ...); got {found.group()!r} "
                         f"at position {found.start()}")
    return value


Text = Annotated[str, Field(max_length=4096), AfterValidator(_no_control)]
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_no_control)]


class ModelSpec(_Strict):
    arch: Name = Field(description="architecture name, e.g. digits_cnn, cifar/resnet18, torchvision/resnet50")
    num_classes: int = Field(ge=2, le=MAX_CLASSES)
    checkpoint: Text = Field(description="a checkpoint id from POST /checkpoints, or a path under an allowed root")
    checkpoint_key: Name | None = Field(None, description="a checkpoint holding two sets of weights (a training "
                                        "checkpoint with an EMA copy: state_dict + state_dict_ema, model + model_ema): "
                                        "the entry to prune")


class DatasetSpec(_Strict):
    spec: Text = Field(description="digits | cifar10:PATH | fashion-mnist:PATH | mnist:PATH | imagefolder:PATH")
    val_fraction: float = Field(0.1, gt=0, le=0.5)
    image_size: int | None = Field(None, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    skip_bad_images: bool = Field(False, description="leave out images that cannot be decoded (counted in metrics.json) "
                                  "instead of failing the job")
    augment: Literal[(AUTO, *AUGMENT_POLICIES)] = Field(  # type: ignore[valid-type]
        "auto", description="training augmentation: imagenet (random resized crop + flip), cifar (pad + random crop + "
        "flip; padding 4 px per 32, 2 px per 28 on mnist and fashion-mnist), shift (the same, no flip), none (the eval "
        "transform); auto: imagefolder imagenet from 96 px and cifar below, cifar10 cifar, mnist and fashion-mnist "
        "shift, digits none. Validation, test and serving preprocess the same whatever it is; metrics.json records "
        "the policy used")
    crop_pct: float | None = Field(None, ge=0.25, le=1.0, description="imagefolder: validation, test and serving "
                                   "resize an image whose short side is over image_size / crop_pct to that short side "
                                   "and keep its centre square (default 0.875, ImageNet's: 256 for 224; 1: the centre "
                                   "square only); a smaller image is resized whole to image_size, nothing cut")


# Options that are the job's, not the schedule's: set elsewhere in the spec or by the executor.
_NOT_SCHEDULE = {"sparsity", "device", "loader_workers"}
# String options with a fixed form, so it appears in the OpenAPI (the range is the core's to check).
_PATTERNS = {"granularity": (GRANULARITY_PATTERN, "'unstructured', 'channel' (whole output channels removed with their "
                             "coupled layers: a smaller, faster dense network) or N:M, e.g. '2:4' (at most N of every M "
                             "consecutive weights of a row kept; sparsity must then be (M-N)/M)")}
# Options with a fixed set of values: the OpenAPI lists them (the core checks them again).
_CHOICES = {"preset": (tuple(PRESETS), "the named configuration the fields it lists default to: 'default' (the best "
                       "measured, docs/fidelity.md) or 'paper' (the paper's algorithm with the authors' hyperparameters)"),
            "kd_loss": (KD_LOSSES, None)}
# Optional numbers with a range: the OpenAPI shows it, the core checks it again.
_OPTIONAL_RANGES = {"target_macs_ratio": (dict(gt=0, lt=1), "granularity 'channel': the multiply-accumulates to keep, as "
                                          "a fraction of the dense model's (0.5: half the compute); replaces sparsity")}


def _schedule_model() -> type[BaseModel]:
    hints = typing.get_type_hints(DG2PFConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(DG2PFConfig):
        if f.name in _NOT_SCHEDULE:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        hint: Any = hints[f.name]
        bounds = BOUNDS.get(f.name)
        # A field a preset lists: null (unset) takes the preset's value.
        preset = (f"unset: the preset's ({'; '.join(f'{p}: {v[f.name]!r}' for p, v in PRESETS.items())})"
                  if f.name in PRESET_FIELDS else None)
        if f.name in _CHOICES:
            values, description = _CHOICES[f.name]
            choice: Any = Literal[values]  # type: ignore[valid-type]
            hint = Annotated[choice | None if f.name in PRESET_FIELDS else choice,
                             Field(description="; ".join(d for d in (description, preset) if d) or None)]
        elif bounds is not None:  # the core's own ranges, so they appear in the OpenAPI
            limits = {"gt" if bounds.low_open else "ge": bounds.low, "lt" if bounds.high_open else "le": bounds.high}
            hint = Annotated[hint, Field(**limits, description=preset)]
        elif f.name in _OPTIONAL_RANGES:
            limits, description = _OPTIONAL_RANGES[f.name]
            hint = Annotated[float | None, Field(**limits, description=description)]
        elif f.name in _PATTERNS:
            pattern, description = _PATTERNS[f.name]
            hint = Annotated[str, Field(max_length=16, pattern=pattern, description=description)]
        elif typing.get_origin(hint) is list:
            hint = Annotated[list[Annotated[str, Field(max_length=MAX_PATTERN_LENGTH)]], Field(max_length=MAX_PATTERNS)]
        elif hint is str or (f.name in PRESET_FIELDS and typing.get_args(hint) and str in typing.get_args(hint)):
            hint = Annotated[hint, Field(max_length=64, description=preset)]
        fields[f.name] = (hint, default)
    return create_model("ScheduleSpec", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)


ScheduleSpec = _schedule_model()


class ResourcesSpec(_Strict):
    num_workers: int = Field(1, ge=1, le=1024, description="DDP workers (1: one process, no DDP)")
    use_gpu: bool = False
    placement: Literal["pack", "spread"] = Field(
        "pack", description="pack: workers on as few nodes as possible (fast collectives); spread: one per node where "
        "possible (losing a node then costs fewer workers, and a restart can still fit on the rest)",
    )


class TuneSpec(_Strict):
    samples: int = Field(4, ge=1, le=256)
    search_space: dict[str, Any] | None = Field(None, max_length=64,
                                                description="option -> distribution, as in `dg2pf tune --search-space`")


class JobSpec(_Strict):
    name: Annotated[str, Field(max_length=128), AfterValidator(_no_control)] | None = None
    model: ModelSpec
    teacher: Text | None = Field(None, description="checkpoint id or path of a separate teacher (same arch)")
    dataset: DatasetSpec
    # At least 0.1%: below it round(s x N) prunes nothing of a model under a thousand weights, and no
    # real job asks for it; values like 5e-324 are typos or probes.
    sparsity: float | None = Field(None, ge=0.001, lt=1, description="fraction of prunable weights (of prunable channels "
                                   "with granularity 'channel') to remove; required unless schedule.target_macs_ratio")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)  # type: ignore[valid-type]
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tune: TuneSpec | None = None
    serve: bool = Field(False, description="deploy the pruned model on Ray Serve when the job succeeds")
    compact_values: Literal["fp32", "fp16"] = Field(
        "fp32", description="value dtype of the compact artifact model.compact.safetensors (fp32: exact)"
    )

    def config(self) -> DG2PFConfig:
        """The DG2PFConfig this spec asks for (raises ConfigError on inconsistent values)."""
        return DG2PFConfig(sparsity=self.sparsity or 0.0, **self.schedule.model_dump())

    def prune_job(self, checkpoint_path: str, teacher_path: str | None, data_roots: list[str] | None = None) -> PruneJob:
        """The engine's job; ``data_roots``: the folders its data must stay inside (the service's)."""
        return PruneJob(
            arch=self.model.arch, num_classes=self.model.num_classes, checkpoint=checkpoint_path,
            checkpoint_key=self.model.checkpoint_key,
            dataset=self.dataset.spec, config=self.config(), teacher=teacher_path,
            image_size=self.dataset.image_size, val_fraction=self.dataset.val_fraction,
            compact_values=self.compact_values, skip_bad_images=self.dataset.skip_bad_images,
            augment=None if self.dataset.augment == AUTO else self.dataset.augment, crop_pct=self.dataset.crop_pct,
            allowed_roots=list(data_roots or []),
        )
