"""What a pruning run gives back: ``Metrics``, the typed ``metrics.json``, and its parts.

Every run writes one ``Metrics`` (``dg2pf_core.job.result_metrics`` builds it, the Ray adapters add their
sections) and everything that reads a result reads it through this type: the CLI's summary, the plots,
serving, the service's job status, the client. The file keeps the shape it always had: top-level keys
for the figures (a channel job's and an N:M job's own ones only in theirs), nested objects for the
history, the ONNX export, the latency and the Ray runs.

Compatibility: multiply-accumulates are ``macs_dense`` / ``macs_sparse``; the names they had before,
``flops_dense`` / ``flops_sparse`` / ``flops_unit``, are still written beside them for one release, and a
file that has only those reads as well. A key this version does not know is kept (read, and written
back), so any run's metrics.json loads.

Beside a model there may be another metrics.json: a pre-trained example's (``ExampleMetrics``).
``ModelInfo`` is what either says about its model: what serving builds the model and its preprocessing from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from .artifacts import Artifacts, write_json

# The names multiply-accumulates had in metrics.json until they were called what they are (written
# beside macs_* for one release; a file with only these reads).
LEGACY_MACS_NAMES = {"flops_dense": "macs_dense", "flops_sparse": "macs_sparse"}
LEGACY_MACS_UNIT = ("flops_unit", "multiply-accumulates of Conv/Linear layers per sample")


class MetricsError(ValueError):
    """A document that is not a run's metrics.json (damaged, cut short, or another file)."""


class _Open(BaseModel):
    # What a newer (or older) version wrote beyond these fields is kept, not refused: any run's file loads.
    model_config = ConfigDict(extra="allow")


class _Document(_Open):
    """A JSON file of its own: read and parsed with errors that name the file and what is wrong in it."""

    _what: ClassVar[str] = Artifacts.METRICS

    @classmethod
    def parse(cls, text: str, where: str = Artifacts.METRICS) -> Self:
        """The document in ``text`` (read from ``where``, named in errors); raises ``MetricsError``."""
        try:
            document = json.loads(text)
        except RecursionError:
            raise MetricsError(f"{where} is nested too deeply to be {cls._what}: the file is damaged") from None
        except ValueError as exc:
            raise MetricsError(
                f"{where} is not valid JSON ({exc}): the file is damaged; take it from the run again"
            ) from None
        if not isinstance(document, dict):
            raise MetricsError(f"{where} holds a JSON {type(document).__name__}, not an object: it is not {cls._what}")
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            errors = exc.errors()
            missing = [".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "missing"]
            if len(missing) == len(errors):  # another file (another tool's, a dg2pf example's): say what it lacks
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                raise MetricsError(f"{where} is not {cls._what}: it has no {shown}") from None
            at = ".".join(str(p) for p in errors[0]["loc"]) or "the document"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise MetricsError(
                f"{where} is not {cls._what} (damaged?): {at}: {errors[0]['msg'].lower()}{more}"
            ) from None

    @classmethod
    def read(cls, path: str | Path) -> Self:
        """The document at ``path``; raises ``OSError`` when it cannot be read, ``MetricsError`` when it
        is not one."""
        path = Path(path)
        return cls.parse(path.read_text(encoding="utf-8"), str(path))


class EpochRecord(_Open):
    """One epoch of a run: an entry of metrics.json's ``history``, a line of a service job's
    progress.jsonl, what a run reports after every epoch."""

    phase: str = Field(description="baseline | gradual_pruning | distillation | finetuning (loop order)")
    epoch: int = Field(description="training epochs completed, all phases (0: the baseline evaluation)")
    sparsity: float = Field(
        description="sparsity of the prunable weights (channel jobs: of the channels) the epoch trained at, a fraction"
    )
    train_loss: float | None = Field(description="mean training loss (None: the baseline, or not finite)")
    val_top1: float = Field(description="validation top-1 after the epoch, in %")
    val_top5: float = Field(description="validation top-5 after the epoch, in %")
    lr: float | None = Field(description="learning rate at the end of the epoch (None: the baseline)")
    seconds: float = Field(description="wall time of the epoch, validation included")
    is_best: bool = Field(False, description="the best validation top-1 at the final sparsity so far: the weights kept")
    restarts: int = Field(0, description="how many times the run had been resumed from a checkpoint before this epoch")
    recovered: int | None = Field(
        None,
        description="pruning epochs: weights a ranking pruned that the next one kept "
        "(weight recovery), summed over the epoch's rankings (the one at its start, against the "
        "previous epoch's last mask, and with rerank_every_steps those inside it); always 0 "
        "with hard gradual masks, which zero pruned weights; None in other phases",
    )
    rankings: int | None = Field(None, description="pruning epochs: how many rankings the epoch made")
    recovered_per_ranking: list[int] | None = Field(
        None, description="pruning epochs: ``recovered``, ranking by ranking"
    )

    def to_dict(self) -> dict[str, Any]:
        """Every field, plain values: what the history, progress.jsonl and Ray's reports hold."""
        return self.model_dump()


class ChannelSummary(_Open):
    """What a channel-granularity run removed, measured against the input model (the loop's result;
    ``result_metrics`` turns it into metrics.json's channel figures)."""

    channels_total: int = Field(description="prunable output channels of the input model")
    channels_pruned: int = Field(description="channels removed")
    macs_dense: int = Field(description="multiply-accumulates of the input model's Conv/Linear layers per sample")
    params_dense: int = Field(description="parameters of the input model")
    params_prunable: int = Field(description="the input model's parameters in tensors some channel group touches")
    skipped_groups: list[str] = Field(description="groups left dense: 'root layer (why)'")
    channel_multiple: int = Field(description="kept widths are multiples of this (rounded up)")
    layer_cap: float = Field(
        description="the most channels of one group the last ranking could remove, a fraction "
        "(resumed after that ranking: estimated)"
    )
    layer_channels: dict[str, float] = Field(
        description="per group (its root layer): the fraction of its channels removed"
    )


class OnnxExport(_Open):
    """The ``onnx`` section: whether ``model.onnx`` was written, and how closely it matches PyTorch."""

    written: bool = Field(description="model.onnx exists and ONNX Runtime's logits matched PyTorch's")
    reason: str | None = Field(None, description="not written: why")
    file: str | None = Field(None, description="written: the file's name")
    opset: int | None = Field(None, description="written: the ONNX opset exported at")
    max_abs_diff: float | None = Field(
        None, description="written: largest |ONNX Runtime - PyTorch| over the check batch"
    )
    tolerance: float | None = Field(None, description="written: the largest difference allowed")
    check_batch: int | None = Field(None, description="written: inputs compared")
    seconds: float | None = Field(None, description="written: time to export and check")


class Quantization(_Open):
    """The ``quantization`` section (precision int8): whether ``model.int8.onnx`` was kept, and why."""

    precision: str = Field(description="what the job asked for: 'int8'")
    written: bool = Field(description="model.int8.onnx exists: its validation top-1 kept max_quantization_drop")
    reason: str | None = Field(None, description="not written: why (with both figures when it lost accuracy)")
    file: str | None = Field(None, description="written: the file's name")
    method: str | None = Field(None, description="the activation calibration kept (the best by validation top-1)")
    candidates: list[dict[str, Any]] = Field(default_factory=list, description="every calibration tried")
    reduce_range: bool | None = Field(None, description="7-bit weights (x86 CPUs without VNNI)")
    calibration_images: int | None = Field(None, description="training images the activations were calibrated on")
    val_top1_fp32: float | None = Field(None, description="model.onnx's validation top-1 (ONNX Runtime)")
    val_top1_int8: float | None = Field(None, description="the int8 model's validation top-1 (ONNX Runtime)")
    test_top1_int8: float | None = Field(None, description="written: the int8 model's test top-1")
    max_drop: float | None = Field(None, description="max_quantization_drop: the points of validation top-1 allowed")
    bytes_fp32: int | None = None
    bytes_int8: int | None = None
    seconds: float | None = Field(None, description="time to calibrate, quantize and check")


class LatencyCell(_Open):
    """One backend at one batch size: medians (and 90th percentiles) of the dense and the pruned model."""

    pruned_ms: float | None = None
    pruned_p90_ms: float | None = None
    runs: int | None = Field(None, description="forward passes timed (of the pruned model)")
    dense_ms: float | None = None
    dense_p90_ms: float | None = None
    speedup: float | None = Field(None, description="dense_ms / pruned_ms: above 1 the pruned model is faster")
    int8_ms: float | None = Field(None, description="precision int8: model.int8.onnx's median")
    int8_p90_ms: float | None = None
    int8_speedup: float | None = Field(None, description="dense_ms / int8_ms")


class Latency(_Open):
    """The ``latency`` section: the unpruned input model and the pruned one timed side by side
    (``dg2pf_core.io.latency``), or why they were not (``measured`` false and ``reason``)."""

    measured: bool = Field(True, description="false: the measurement failed (``reason``); present only then")
    reason: str | None = Field(None, description="not measured: why")
    device: str | None = Field(None, description="where the torch and onnxruntime rows ran (cpu)")
    cpu: str | None = Field(None, description="the CPU's model name")
    threads: int | None = Field(None, description="torch / ONNX Runtime intra-op threads")
    runs: int | None = Field(None, description="timed runs asked for per cell")
    warmup: int | None = Field(None, description="untimed runs before them")
    budget_s: float | None = Field(None, description="the time the measurement was allowed")
    seconds: float | None = Field(None, description="the time it took")
    cuda_device: str | None = Field(None, description="the GPU of the torch_cuda rows, when the job ran on one")
    backends: dict[str, dict[str, LatencyCell]] = Field(
        default_factory=dict, description="backend (torch, onnxruntime, torch_cuda) -> batch size -> timings"
    )
    macs_ratio: float | None = Field(None, description="macs_sparse / macs_dense, to read the speed-ups against")
    notes: list[str] = Field(default_factory=list, description="what was left out and why")

    def speedups(self) -> dict[str, Any]:
        """The compact view (the service's job status): the speed-up per backend and batch size, the
        MACs ratio beside them, and the threads they were measured with."""
        return {
            "speedup": {b: {n: cell.speedup for n, cell in by_batch.items()} for b, by_batch in self.backends.items()},
            "macs_ratio": self.macs_ratio,
            "threads": self.threads,
        }


class LatencyObjective(_Open):
    """The ``latency_objective`` section of a job pruned to ``latency_budget_ms``: the budget, what the
    per-layer latency table predicted for the final network and what that network measured end to end,
    on the same backend, threads and batch size (dg2pf_core/algorithm/latency_table.py)."""

    budget_ms: float = Field(description="latency_budget_ms, as asked")
    aim_ms: float | None = Field(
        None, description="what the table was asked to predict, calibrated so the network measures within the budget"
    )
    backend: str = Field(description="onnxruntime or torch")
    threads: int
    batch_size: int
    cpu: str = Field(description="the machine the table and the measurements are of")
    dense_measured_ms: float = Field(description="the input model, measured end to end when the table was built")
    predicted_ms: float = Field(description="the final network, as the table predicts it")
    measured_ms: float | None = Field(None, description="the final network, measured end to end (null: failed)")
    error: float | None = Field(None, description="predicted / measured - 1 (0.05: the table said 5% more)")
    met: bool | None = Field(None, description="measured_ms <= budget_ms")
    calibration: list[dict[str, float]] = Field(
        default_factory=list,
        description="before training: per round, the aim, the table's prediction and the network measured (ms)",
    )
    table_layers: int = Field(description="Conv/Linear layers the table holds")
    table_seconds: float = Field(description="what measuring the table took")
    table_notes: list[str] = Field(default_factory=list)


class ParetoPoint(_Open):
    """One trial of a max_top1_drop search: the budget it was given, what it became, how it scored."""

    trial_id: str
    status: str = Field(description="completed, stopped_early or failed")
    budget_ms: float = Field(description="the latency budget this trial was to meet (measured)")
    aim_ms: float = Field(description="what the latency table was asked to predict (calibrated for the budget)")
    predicted_ms: float | None = Field(None, description="the trial's network, as the table predicts it")
    measured_ms: float | None = Field(
        None, description="the trial's network measured end to end after the search, one network at a time"
    )
    macs: int | None = None
    params: int | None = None
    channels_pruned: int | None = None
    val_top1: float | None = Field(None, description="its best validation top-1")
    within_drop: bool | None = Field(None, description="val_top1 >= the input model's val top-1 - max_top1_drop")
    int8_measured_ms: float | None = Field(
        None, description="precision int8: the trial's kept int8 model measured like measured_ms (ONNX Runtime)"
    )
    int8_val_top1: float | None = Field(None, description="precision int8: the kept int8 model's validation top-1")
    int8_within_drop: bool | None = Field(None, description="int8_val_top1 >= the floor")
    chosen: bool = False
    chosen_precision: str | None = Field(
        None, description="chosen: which of the trial's models is the job's ('fp32' or 'int8')"
    )
    error: str | None = None


class ObjectiveSearch(_Open):
    """The ``objective`` section of a max_top1_drop job: the constraint, the choice and why."""

    max_top1_drop: float
    baseline_val_top1: float = Field(description="the input model's validation top-1")
    floor_val_top1: float = Field(description="baseline_val_top1 - max_top1_drop: what a trial must keep")
    met: bool = Field(description="a trial kept the floor (false: the most accurate trial is the model)")
    chosen_trial: str
    chosen_precision: str = Field("fp32", description="'int8' when the chosen trial's int8 model is the job's")
    reason: str = Field(description="why this trial is the job's model, in words")
    backend: str
    threads: int
    batch_size: int
    dense_measured_ms: float
    budgets_ms: list[float]
    points: list[ParetoPoint] = Field(description="every trial (as pareto.json)")
    skipped: list[str] = Field(
        default_factory=list, description="budgets not tried: measured out of reach here before any trial, and why"
    )
    wall_seconds: float


class DistributedRun(_Open):
    """The ``distributed`` section of a Ray Train run (DDP workers)."""

    backend: str = Field(description="torch.distributed's backend (gloo, nccl)")
    worker_nodes: list[str] = Field(description="the Ray node of each rank")
    mask_checksums: list[tuple[int, list[int]]] = Field(
        description="[epoch, one mask checksum per rank]: every rank pruned the same weights when they agree"
    )


class RayRun(_Open):
    """The ``ray_run`` section: where Ray Train kept the run's checkpoints."""

    storage_path: str | None = Field(description="the checkpoints' storage; None: a temporary one, removed")
    name: str = Field(description="the run's name under it")


class TrialRow(_Open):
    """One trial of a tune run (a row of trials.csv); its sampled options are the ``config.NAME`` keys."""

    trial_id: str
    status: str = Field(description="completed | stopped_early (by ASHA) | failed")
    val_top1: float | None = Field(None, description="best validation top-1 at the final sparsity, in %")
    test_top1: float | None = Field(None, description="completed trials: test top-1 of the kept model, in %")
    sparsity: float | None = Field(None, description="sparsity reached, when at the target")
    epochs: int | None = None
    wall_seconds: float | None = None
    error: str | None = Field(None, description="failed trials: the last line of the error")


class TuneSummary(_Open):
    """The ``tune`` section of a tune run: the search and the trial that won it (whose model this is)."""

    best_trial: str
    best_config: dict[str, Any] = Field(description="the winning trial's full DG2PF configuration")
    search_space: dict[str, Any] = Field(description="the search space as given (YAML/JSON document)")
    samples: int
    scheduler: str = Field(description="how trials were stopped early and ranked")
    trials: list[TrialRow]
    storage_path: str | None = Field(description="Ray Tune's storage; None: a temporary one, removed")
    name: str = Field(description="the experiment's name under it")
    wall_seconds: float


class Metrics(_Document):
    """A finished run's result: ``metrics.json``.

    Written as built: an optional field never set (an N:M job's ``nm_violations`` in an unstructured one, a
    Ray section in a single-process run) is left out of the file, not written as null."""

    _what: ClassVar[str] = "a dg2pf run's metrics.json"

    # What was pruned, on what.
    arch: str = Field(description="the architecture's registry name")
    num_classes: int
    dataset: str = Field(description="the dataset spec (name, or name:path with the path absolute)")
    image_size: int = Field(description="input height = width, in pixels")
    augment: str | None = Field(
        None, description="the training augmentation policy used (asked for, or the dataset's default)"
    )
    crop_pct: float | None = Field(
        None, description="folder datasets' evaluation crop (validation, test, serving); None where no crop applies"
    )
    mean: list[float] | None = Field(
        None,
        description="folder datasets' normalisation mean (the architecture's own, else ImageNet's), what serving "
        "uses (None: a model written before it was recorded)",
    )
    std: list[float] | None = Field(None, description="the same, its std")
    interpolation: str | None = Field(None, description="the same, its resize filter")
    in_channels: int
    class_names: list[str] | None = Field(description="labels by class index (None: the dataset names none)")
    target_sparsity: float | None = Field(
        description="the sparsity asked for; None for a channel job sized by target_macs_ratio, latency_budget_ms "
        "or max_top1_drop"
    )
    granularity: str = Field("unstructured", description="unstructured | N:M | channel")
    preset: str | None = Field(None, description="the named configuration the job started from")
    preset_departures: dict[str, Any] = Field(
        default_factory=dict, description="what the job set otherwise than its preset (``config`` holds every value)"
    )
    bn_settled_channels: int | None = Field(
        None, description="BatchNorm channels constant within every batch, settled to output their bias"
    )
    nm_violations: int | None = Field(
        None, description="N:M jobs: groups of the written weights with more than N nonzeros (0: the pattern holds)"
    )
    # Channel jobs only: the result is a smaller dense network, measured against the input model.
    target_macs_ratio: float | None = Field(
        None, description="channel jobs: the MACs target asked for (pruned / dense)"
    )
    channels_total: int | None = Field(None, description="channel jobs: prunable output channels of the input model")
    channels_pruned: int | None = Field(None, description="channel jobs: channels removed")
    channel_sparsity: float | None = Field(None, description="channel jobs: channels_pruned / channels_total")
    macs_ratio: float | None = Field(None, description="channel jobs: macs_sparse / macs_dense")
    params_dense: int | None = Field(None, description="channel jobs: parameters of the input model")
    params_ratio: float | None = Field(None, description="channel jobs: params_total / params_dense")
    skipped_groups: list[str] | None = Field(None, description="channel jobs: groups left dense, 'root layer (why)'")
    channel_multiple: int | None = Field(None, description="channel jobs: kept widths are multiples of this")
    # Size.
    sparsity_prunable: float = Field(
        description="fraction of the prunable weights pruned (channel jobs: of the channels removed)"
    )
    sparsity_total: float = Field(
        description="fraction of all parameters pruned (channel jobs: of the input model's parameters, removed)"
    )
    params_total: int = Field(description="parameters of the pruned model")
    params_nonzero: int = Field(description="nonzero parameters of the pruned model")
    params_prunable: int = Field(
        description="parameters in prunable tensors (channel jobs: the input model's, in tensors some group touches)"
    )
    macs_dense: int = Field(description="multiply-accumulates of the Conv/Linear layers per sample, of the input model")
    macs_sparse: int = Field(description="the same, counting only nonzero weights of the pruned model")
    # Accuracy and the run.
    baseline_val_top1: float = Field(description="validation top-1 of the input model, in %")
    baseline_test_top1: float | None = Field(description="test top-1 of the input model, in % (None: no test split)")
    val_top1: float = Field(description="validation top-1 of the kept (best) epoch, in %")
    test_top1: float | None = Field(description="test top-1 of the pruned model, in % (None: no test split)")
    test_top5: float | None = Field(description="test top-5 of the pruned model, in %")
    best_epoch: int = Field(description="the epoch whose weights were kept")
    epochs: int = Field(description="training epochs run, all phases")
    final_phase: str | None = Field(description="the phase of the last epoch")
    world_size: int = Field(description="DDP workers that trained")
    wall_seconds: float = Field(description="preflight, training and evaluation (Ray: on the workers)")
    layer_sparsity: dict[str, float] = Field(
        description="per prunable weight (channel jobs: per group's root layer), "
        "the fraction pruned, in the network's order"
    )
    max_layer_sparsity: float | None = Field(None, description="the largest of layer_sparsity")
    layer_cap: float | None = Field(
        None, description="the most one layer could be pruned (global scope; None: no cap applies)"
    )
    warnings: list[str] = Field(
        default_factory=list, description="what the data, the run and the result found a user should know"
    )
    dtype: str | None = Field(
        None, description="the input checkpoint's floating dtype(s), which model.safetensors keeps"
    )
    skipped_images: int = Field(0, description="unreadable images left out (skip_bad_images)")
    skipped_image_files: list[str] = Field(default_factory=list, description="the first 100 of them")
    config: dict[str, Any] = Field(description="every option of the DG2PF configuration the run used")
    history: list[EpochRecord] = Field(description="one record per epoch (a resumed run repeats the epochs it redid)")
    # Sections of the written model and of the engine that ran it.
    onnx: OnnxExport | None = Field(None, description="the ONNX export (absent: the run predates it)")
    latency: Latency | None = Field(None, description="dense against pruned latency (absent: the run predates it)")
    quantization: Quantization | None = Field(None, description="precision int8: the int8 model and its check")
    latency_objective: LatencyObjective | None = Field(
        None, description="jobs pruned to latency_budget_ms: the budget, the table's prediction, the measurement"
    )
    distributed: DistributedRun | None = Field(None, description="Ray Train runs: the DDP workers")
    driver_wall_seconds: float | None = Field(None, description="Ray Train runs: the whole run as the driver saw it")
    ray_run: RayRun | None = Field(None, description="Ray Train runs: where its checkpoints are")
    tune: TuneSummary | None = Field(None, description="tune runs: the search")
    objective: ObjectiveSearch | None = Field(
        None, description="max_top1_drop jobs: the constraint, every trial's measured point, the choice"
    )

    @model_validator(mode="before")
    @classmethod
    def _read_legacy_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and (set(LEGACY_MACS_NAMES) | {LEGACY_MACS_UNIT[0]}) & data.keys():
            data = dict(data)
            for old, new in LEGACY_MACS_NAMES.items():
                if old in data:
                    value = data.pop(old)
                    data.setdefault(new, value)
            data.pop(LEGACY_MACS_UNIT[0], None)
        return data

    @model_serializer(mode="wrap")
    def _write_legacy_names(self, handler) -> dict[str, Any]:
        document = handler(self)
        if "macs_sparse" not in document:  # a partial dump (include=...) asked for other fields
            return document
        out: dict[str, Any] = {}
        for key, value in document.items():
            out[key] = value
            if key == "macs_sparse":
                out.update({old: document.get(new) for old, new in LEGACY_MACS_NAMES.items()})
                out[LEGACY_MACS_UNIT[0]] = LEGACY_MACS_UNIT[1]
        return out

    def to_document(self) -> dict[str, Any]:
        """The JSON object of metrics.json: plain values, the fields set, the legacy MAC names beside macs_*."""
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, path: str | Path) -> None:
        """Write metrics.json to ``path``, whole or not at all (non-finite numbers as null)."""
        write_json(path, self.to_document())


class ExampleMetrics(_Document):
    """The metrics.json of a pre-trained example (``dg2pf example``): the dense model's own training, the
    input of pruning jobs, not a pruning run's result."""

    _what: ClassVar[str] = "a dg2pf example's metrics.json"

    arch: str
    num_classes: int
    dataset: str
    image_size: int
    epochs: int = Field(description="training epochs run")
    max_epochs: int = Field(
        description="the most it would have run (fewer: no better validation top-1 for patience epochs)"
    )
    best_epoch: int = Field(description="the epoch whose weights were kept")
    val_top1: float = Field(description="validation top-1 of the kept epoch, in %")
    test_top1: float | None = Field(description="test top-1 of the kept weights, in % (None: no test split)")
    test_top5: float | None
    wall_seconds: float

    def write(self, path: str | Path) -> None:
        """Write metrics.json to ``path``, whole or not at all."""
        write_json(path, self.model_dump(mode="json"))


class ModelInfo(_Document):
    """What the metrics.json beside a model says about the model itself, whoever wrote it (a pruning run:
    ``Metrics``; a pre-trained example: ``ExampleMetrics``): what serving, ``dg2pf predict`` and
    ``dg2pf evaluate`` build the model and its preprocessing from."""

    _what: ClassVar[str] = "the metrics.json of a dg2pf model"

    arch: str = Field(description="the architecture's registry name")
    num_classes: int
    dataset: str = Field(description="the dataset spec it was trained on: its name picks the eval transform")
    image_size: int | None = Field(None, description="input height = width (None: the architecture's)")
    in_channels: int | None = Field(None, description="input channels (None: the architecture's)")
    class_names: list[str] | None = Field(None, description="labels by class index")
    crop_pct: float | None = Field(None, description="folder datasets' evaluation crop")
    mean: list[float] | None = Field(None, description="folder datasets' normalisation (None: the architecture's)")
    std: list[float] | None = None
    interpolation: str | None = None
    onnx: OnnxExport | None = Field(None, description="a pruning run's ONNX export, when it has one")
    quantization: Quantization | None = Field(None, description="a precision int8 run's int8 model, when asked")
