"""The job spec: one pydantic type describes a pruning job everywhere: POST /jobs, ``dg2pf submit``,
``dg2pf prune JOB.yaml``, the recipes in recipes/, the runner's job.json.

``schedule`` is generated from the algorithm's options (``dg2pf_contract.options.Options``), so every option
of the algorithm is settable here and the two can never drift apart. Unknown fields are rejected at every
level. dg2pf_core checks the options again, with what needs the core (``dg2pf_core.job.preflight.check_static``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import stat
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WrapValidator,
    create_model,
)
from pydantic_core import PydanticCustomError

from .options import (
    BOUNDS,
    GRANULARITY_PATTERN,
    KD_LOSSES,
    LATENCY_BACKENDS,
    LATENCY_BUDGET_BOUNDS,
    MAX_PATTERN_LENGTH,
    MAX_PATTERNS,
    PRECISIONS,
    PRESET_FIELDS,
    PRESETS,
    TOP1_DROP_BOUNDS,
    Options,
)

MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; beyond this a classifier alone is gigabytes
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 2048
# Training augmentation policies (dg2pf_core/data/transforms.py builds them):
#   imagenet: random resized crop (8% to 100% of the image) + horizontal flip
#   cifar:    pad + random crop back to size + horizontal flip
#   shift:    pad + random crop back to size, no flip
#   none:     the eval transform for training too
AUGMENT_POLICIES = ("imagenet", "cifar", "shift", "none")
AUTO = "auto"  # the dataset's default


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
        raise ValueError(
            f"must not contain control characters (NUL, escape, CR, LF, ...); got {found.group()!r} "
            f"at position {found.start()}"
        )
    return value


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "string_pattern_mismatch"}


def _no_bool(value: Any) -> Any:
    """A number given as true/false (YAML's yes/no) is no number: pydantic would read true as 1."""
    if isinstance(value, bool):
        raise PydanticCustomError("not_a_number", "must be a number, got {value}", {"value": str(value).lower()})
    return value


def worded(valid: str) -> WrapValidator:
    """A field's range or form error in words a user acts on ("must be in [8, 2048], got 100000") instead
    of pydantic's ("Input should be less than or equal to 2048"); the bounds stay in the OpenAPI."""

    def check(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            if any(e["type"] in _RANGE_ERRORS for e in exc.errors()):
                raise PydanticCustomError(
                    "out_of_range",
                    "must be {valid}, got {value}",
                    {"valid": valid, "value": repr(value) if isinstance(value, str) else value},
                ) from None
            raise

    return WrapValidator(check)


Text = Annotated[str, Field(max_length=4096), AfterValidator(_no_control)]
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_no_control)]


class ModelSpec(_Strict):
    arch: Name = Field(description="architecture name, e.g. digits_cnn, cifar/resnet18, torchvision/resnet50")
    num_classes: Annotated[int, worded(f"in [2, {MAX_CLASSES:,}]")] = Field(ge=2, le=MAX_CLASSES)
    checkpoint: Text = Field(description="a checkpoint id from POST /checkpoints, or a path under an allowed root")
    checkpoint_key: Name | None = Field(
        None,
        description="a checkpoint holding two sets of weights (a training "
        "checkpoint with an EMA copy: state_dict + state_dict_ema, model + model_ema): "
        "the entry to prune",
    )


class DatasetSpec(_Strict):
    spec: Text = Field(description="digits | cifar10:PATH | fashion-mnist:PATH | mnist:PATH | imagefolder:PATH")
    val_fraction: Annotated[float, worded("in (0, 0.5]")] = Field(0.1, gt=0, le=0.5)
    image_size: Annotated[int | None, worded(f"in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")] = Field(
        None, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE
    )
    skip_bad_images: bool = Field(
        False,
        description="leave out images that cannot be decoded (counted in metrics.json) instead of failing the job",
    )
    augment: Literal[(AUTO, *AUGMENT_POLICIES)] = Field(  # type: ignore[valid-type]
        "auto",
        description="training augmentation: imagenet (random resized crop + flip), cifar (pad + random crop + "
        "flip; padding 4 px per 32, 2 px per 28 on mnist and fashion-mnist), shift (the same, no flip), none (the eval "
        "transform); auto: imagefolder imagenet from 96 px and cifar below, cifar10 cifar, mnist and fashion-mnist "
        "shift, digits none. Validation, test and serving preprocess the same whatever it is; metrics.json records "
        "the policy used",
    )
    crop_pct: Annotated[float | None, worded("in [0.25, 1]")] = Field(
        None,
        ge=0.25,
        le=1.0,
        description="imagefolder: validation, test and serving "
        "resize an image whose short side is over image_size / crop_pct to that short side "
        "and keep its centre square (default 0.875, ImageNet's: 256 for 224; 1: the centre "
        "square only); a smaller image is resized whole to image_size, nothing cut",
    )


# Options that are the job's, not the schedule's: set elsewhere in the spec or by the executor.
_NOT_SCHEDULE = {"sparsity", "device", "loader_workers"}
# String options with a fixed form, so it appears in the OpenAPI (the range is the core's to check).
_PATTERNS = {
    "granularity": (
        GRANULARITY_PATTERN,
        "'unstructured', 'channel' (whole output channels removed with their "
        "coupled layers: a smaller, faster dense network) or N:M, e.g. '2:4' (at most N of every M "
        "consecutive weights of a row kept; sparsity must then be (M-N)/M)",
    )
}
# Options with a fixed set of values: the OpenAPI lists them (the core checks them again).
_CHOICES = {
    "preset": (
        tuple(PRESETS),
        "the named configuration the fields it lists default to: 'default' (the best "
        "measured, docs/fidelity.md) or 'paper' (the paper's algorithm with the authors' hyperparameters)",
    ),
    "kd_loss": (KD_LOSSES, None),
    "latency_backend": (LATENCY_BACKENDS, "what latency_budget_ms is measured on: ONNX Runtime or PyTorch eager (CPU)"),
    "precision": (
        PRECISIONS,
        "'int8': also write model.int8.onnx (ONNX Runtime static quantization), kept only within "
        "max_quantization_drop points of the fp32 model's validation top-1",
    ),
}
# Optional file paths (a service reads them only under its data roots).
_PATH_OPTIONS = {
    "latency_table": "with latency_budget_ms: a latency table file written by `dg2pf latency-table` on the serving "
    "machine (default: the job measures one where it runs)",
}
# Optional numbers with a range: the OpenAPI shows it, the core checks it again.
_OPTIONAL_RANGES = {
    "target_macs_ratio": (
        dict(gt=0, lt=1),
        "granularity 'channel': the multiply-accumulates to keep, as "
        "a fraction of the dense model's (0.5: half the compute); replaces sparsity",
        "strictly between 0 and 1 (0.5: half the multiply-accumulates)",
    ),
    "latency_budget_ms": (
        dict(gt=LATENCY_BUDGET_BOUNDS.low, le=LATENCY_BUDGET_BOUNDS.high),
        "granularity 'channel': the latency (ms) the pruned network may take on the job's machine, as "
        "latency_backend runs it with latency_threads threads at batch latency_batch_size; replaces sparsity",
        f"milliseconds in {LATENCY_BUDGET_BOUNDS.text()}",
    ),
    "max_top1_drop": (
        dict(gt=TOP1_DROP_BOUNDS.low, le=TOP1_DROP_BOUNDS.high),
        "granularity 'channel': the fastest network (by the latency options) whose validation top-1 is at most "
        "this many points under the input model's, found by a search over latency budgets on Ray Tune; "
        "replaces sparsity",
        f"points of top-1 in {TOP1_DROP_BOUNDS.text()}",
    ),
}


def _schedule_model() -> type[BaseModel]:
    hints = typing.get_type_hints(Options)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Options):
        if f.name in _NOT_SCHEDULE:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        hint: Any = hints[f.name]
        bounds = BOUNDS.get(f.name)
        # A field a preset lists: null (unset) takes the preset's value.
        preset = (
            f"unset: the preset's ({'; '.join(f'{p}: {v[f.name]!r}' for p, v in PRESETS.items())})"
            if f.name in PRESET_FIELDS
            else None
        )
        if f.name in _CHOICES:
            values, description = _CHOICES[f.name]
            choice: Any = Literal[values]  # type: ignore[valid-type]
            hint = Annotated[
                choice | None if f.name in PRESET_FIELDS else choice,
                Field(description="; ".join(d for d in (description, preset) if d) or None),
            ]
        elif bounds is not None:  # the core's own ranges, so they appear in the OpenAPI
            limits = {"gt" if bounds.low_open else "ge": bounds.low, "lt" if bounds.high_open else "le": bounds.high}
            hint = Annotated[
                hint, Field(**limits, description=preset), worded(f"in {bounds.text()}"), BeforeValidator(_no_bool)
            ]
        elif f.name in _OPTIONAL_RANGES:
            limits, description, wording = _OPTIONAL_RANGES[f.name]
            hint = Annotated[
                float | None, Field(**limits, description=description), worded(wording), BeforeValidator(_no_bool)
            ]
        elif f.name in _PATTERNS:
            pattern, description = _PATTERNS[f.name]
            hint = Annotated[
                str,
                Field(max_length=16, pattern=pattern, description=description),
                worded("'unstructured', 'channel' or N:M such as '2:4'"),
            ]
        elif f.name in _PATH_OPTIONS:
            path = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_control)]
            hint = Annotated[path | None, Field(description=_PATH_OPTIONS[f.name])]
        elif typing.get_origin(hint) is list:
            hint = Annotated[list[Annotated[str, Field(max_length=MAX_PATTERN_LENGTH)]], Field(max_length=MAX_PATTERNS)]
        elif hint is str or (f.name in PRESET_FIELDS and typing.get_args(hint) and str in typing.get_args(hint)):
            hint = Annotated[hint, Field(max_length=64, description=preset)]
        fields[f.name] = (hint, default)
    return create_model("ScheduleSpec", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)


ScheduleSpec = _schedule_model()


class ResourcesSpec(_Strict):
    num_workers: Annotated[int, worded("in [1, 1024]")] = Field(
        1, ge=1, le=1024, description="DDP workers (1: one process, no DDP)"
    )
    use_gpu: bool = False
    placement: Literal["pack", "spread"] = Field(
        "pack",
        description="pack: workers on as few nodes as possible (fast collectives); spread: one per node where "
        "possible (losing a node then costs fewer workers, and a restart can still fit on the rest)",
    )


def _not_empty(space: dict[str, Any] | None) -> dict[str, Any] | None:
    if space == {}:
        raise ValueError("must name at least one option, or be left out for the built-in space")
    return space


class TuneSpec(_Strict):
    samples: Annotated[int, worded("in [1, 256]")] = Field(4, ge=1, le=256)
    search_space: Annotated[dict[str, Any] | None, AfterValidator(_not_empty)] = Field(
        None, max_length=64, description="option -> distribution, as in `dg2pf tune --search-space`"
    )


class JobSpec(_Strict):
    name: Annotated[str, Field(max_length=128), AfterValidator(_no_control)] | None = None
    model: ModelSpec
    teacher: Text | None = Field(None, description="checkpoint id or path of a separate teacher (same arch)")
    dataset: DatasetSpec
    # At least 0.1%: below it round(s x N) prunes nothing of a model under a thousand weights, and no
    # real job asks for it; values like 5e-324 are typos or probes.
    sparsity: Annotated[float | None, worded("strictly between 0 and 1, at least 0.001 (e.g. 0.9 for 90%)")] = Field(
        None,
        ge=0.001,
        lt=1,
        description="fraction of prunable weights (of prunable channels "
        "with granularity 'channel') to remove; required unless schedule.target_macs_ratio, "
        "schedule.latency_budget_ms or schedule.max_top1_drop",
    )
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)  # type: ignore[valid-type]
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tune: TuneSpec | None = None
    serve: bool = Field(False, description="deploy the pruned model on Ray Serve when the job succeeds")
    compact_values: Literal["fp32", "fp16"] = Field(
        "fp32", description="value dtype of the compact artifact model.compact.safetensors (fp32: exact)"
    )

    @classmethod
    def read(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
        """The job in a JSON or YAML file, with ``KEY=VALUE`` overrides (``apply_overrides``); raises
        JobFileError for a file that is no job, pydantic's ValidationError for a field at fault."""
        return cls.model_validate(apply_overrides(read_job_file(path), list(overrides)))


class JobFileError(ValueError):
    """A job file that cannot be read as a job (not the fields: those are ``JobSpec``'s ValidationError)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


MAX_JOB_FILE_BYTES = 1 << 20  # as the API's largest request body (DG2PF_MAX_REQUEST_BYTES' default)
MAX_JOB_VALUES = 100_000  # values in a job document once YAML aliases are expanded: a job has a few hundred
MAX_JOB_DEPTH = 32


def read_job_file(path: str | Path) -> dict[str, Any]:
    """A job file as the mapping POST /jobs takes: JSON, or YAML when PyYAML is installed (the light client's
    ``[yaml]`` extra; the full package has it). Only what JSON can hold is a job (no YAML dates, bytes or
    sets), NaN and Infinity are refused as the API does, and so are files over a MiB, nesting deeper than
    ``MAX_JOB_DEPTH`` and YAML aliases expanding beyond ``MAX_JOB_VALUES`` values."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise JobFileError(f"job spec {path} is not a regular file")
        if info.st_size > MAX_JOB_FILE_BYTES:
            raise JobFileError(
                f"job spec {path} is {info.st_size:,} bytes; a job spec is at most "
                f"{MAX_JOB_FILE_BYTES:,} (a few KB is usual)"
            )
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is no error
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(f"cannot read job spec {path}: {exc}") from None
    if not text.strip():
        raise JobFileError(f"job spec {path} is empty")

    def no_constant(name: str) -> object:
        raise ValueError(f"{name} is not a JSON number")

    try:
        doc = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise JobFileError(f"job spec {path} is nested too deeply to be a job spec") from None
    except ValueError as json_error:
        try:
            import yaml
        except ImportError:
            raise JobFileError(
                f"job spec {path} is not JSON ({json_error}); for YAML install PyYAML: pip install 'dg2pf-client[yaml]'"
            ) from None
        try:
            doc = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())
            raise JobFileError(f"cannot read job spec {path}: {reason}") from None
    if not isinstance(doc, dict):
        raise JobFileError(
            f"job spec {path} must be a mapping of fields (model, dataset, sparsity, ...), not {type(doc).__name__}"
        )
    _check_plain(doc, f"job spec {path}")
    return doc


def _check_plain(doc: Any, where: str) -> None:
    """Refuse what JSON cannot carry (YAML dates, bytes, sets, non-text keys, NaN) and documents too deep or,
    with YAML aliases, too large once expanded, before anything copies or sends them."""
    budget = MAX_JOB_VALUES
    stack: list[tuple[Any, str, int]] = [(doc, "", 0)]
    while stack:
        value, at, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise JobFileError(
                f"{where} holds more than {MAX_JOB_VALUES:,} values (YAML aliases expand): not a job spec"
            )
        if depth > MAX_JOB_DEPTH:
            raise JobFileError(
                f"{where} is nested deeper than {MAX_JOB_DEPTH} levels at {at or 'the top'}: not a job spec"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise JobFileError(
                        f"{where}: the key {_printable(repr(key))} under {at or 'the top'} is not text",
                        field=at or None,
                    )
                stack.append((item, f"{at}.{key}" if at else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{at}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise JobFileError(f"{where}: {_printable(at)} is {value}, not a finite number", field=at)
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise JobFileError(
                f"{where}: {_printable(at)} is a YAML {type(value).__name__}, which a job spec cannot "
                "hold (quote it to make it text)",
                field=at,
            )


def _printable(text: str) -> str:
    """``text`` with control characters escaped, as it may be printed on a terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``doc`` with ``KEY=VALUE`` overrides applied (``--set schedule.lr=0.001``): KEY a dotted path of
    JobSpec fields, VALUE read as JSON where it is JSON (numbers, true, null, lists, objects) and as text
    otherwise."""
    doc = copy.deepcopy(doc)  # shared YAML aliases stay shared: nothing expands here
    for override in overrides:
        key, sep, raw = override.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise JobFileError(
                f"--set {_printable(repr(override))}: give KEY=VALUE, KEY a dotted field path such as schedule.lr or "
                "dataset.image_size",
                field=key.strip() or None,
            )

        def no_constant(name: str) -> object:
            raise ValueError(f"{name} is not a JSON number")

        try:
            value: Any = json.loads(raw, parse_constant=no_constant)
        except RecursionError:
            raise JobFileError(f"--set {key}: the value is nested too deeply", field=key) from None
        except ValueError as exc:
            if raw.lstrip()[:1] in ("{", "["):  # meant as JSON: say why it is not
                raise JobFileError(f"--set {key}: the value is not JSON ({exc})", field=key) from None
            value = raw
        _check_plain(value, f"--set {key}")
        node = doc
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise JobFileError(
                    f"--set {_printable(repr(override))}: {'.'.join(path[: i + 1])} is not a section of fields",
                    field=".".join(path[: i + 1]),
                )
            node = child
        node[path[-1]] = value
    return doc


def describe(error: ValidationError) -> tuple[str | None, str]:
    """The first problem of a JobSpec ValidationError as (dotted field, message): what the API's 422 says,
    control characters escaped (a key in the input may hold any)."""
    first = next(iter(error.errors()), {})
    field = _printable(".".join(str(p) for p in first.get("loc", ()))) or None
    message = _printable(str(first.get("msg", error)))
    return field, f"{field}: {message}" if field else message
