"""The DG2PF loop: phase order, final sparsity, best-model choice, pruned weights stay 0, resume."""

import pytest
import torch
from tiny import TinyNet

from dg2pf_core import DG2PFConfig, TrainingState, run_dg2pf
from dg2pf_core.algorithm.masks import recovered, select_prunable
from dg2pf_core.errors import ConfigError, DG2PFError, ResumeError

CFG = dict(
    sparsity=0.8,
    pruning_epochs=3,
    patience=2,
    max_epochs=12,
    batch_size=16,
    lr=5e-3,
    finetune_lr=1e-2,
    seed=0,
    schedule="linear",
)


def _model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


class Watch:
    """Reporter + progress: saves every epoch's state and checks hard-masked steps."""

    def __init__(self, save_dir=None):
        self.save_dir, self.records, self.masks, self.phase, self.model = save_dir, [], None, None, None
        self.zero_checks = 0
        self.mask_history = []

    def __call__(self, record, state):
        self.records.append(record)
        self.masks = {k: v.clone() for k, v in state.masks.items()}
        self.mask_history.append(self.masks)
        if self.save_dir is not None:
            state.save(self.save_dir / f"epoch{record.epoch}")

    def start_epoch(self, phase, epoch, sparsity, batches):
        self.phase = phase

    def batch(self, loss):
        if self.phase in ("distillation", "finetuning"):
            params = select_prunable(self.model).params
            for name, mask in self.masks.items():
                assert (params[name][mask] == 0).all(), f"pruned weight of {name} nonzero in {self.phase}"
            self.zero_checks += 1

    def end_epoch(self, record):
        pass


def test_phases_sparsity_and_best_model(tiny_loaders):
    model = _model()
    w = Watch()
    w.model = model
    result = run_dg2pf(model, tiny_loaders, DG2PFConfig(**CFG), reporter=w, progress=w)
    phases = [r.phase for r in w.records]
    assert phases[0] == "baseline"
    assert phases[1:4] == ["gradual_pruning"] * 3
    assert set(phases[4:]) <= {"distillation", "finetuning"} and "finetuning" in phases
    assert phases == sorted(phases, key=["baseline", "gradual_pruning", "distillation", "finetuning"].index)
    assert [r.sparsity for r in w.records[1:4]] == pytest.approx([0.8 / 3, 1.6 / 3, 0.8], abs=1e-3)
    assert w.zero_checks > 0
    # the result: exactly the target sparsity, the best validation epoch at the final sparsity
    params = select_prunable(result.model).params
    n = sum(p.numel() for p in params.values())
    assert sum(int((p == 0).sum()) for p in params.values()) >= round(0.8 * n)
    assert sum(int(m.sum()) for m in result.masks.values()) == round(0.8 * n)
    final = [r for r in w.records if r.epoch >= 3]
    best = max(final, key=lambda r: r.val_top1)
    assert result.best_val_top1 == best.val_top1
    assert result.best_epoch >= 3  # never an epoch below the final sparsity
    assert result.epochs <= CFG["max_epochs"]


@pytest.mark.parametrize("stop_after", [2, 5, 8])
def test_resume_ends_with_the_same_weights(tiny_loaders, tmp_path, stop_after):
    full = Watch(tmp_path)
    result = run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**CFG), reporter=full)
    assert stop_after < full.records[-1].epoch
    state = TrainingState.load(tmp_path / f"epoch{stop_after}")
    resumed = Watch()
    again = run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**CFG), reporter=resumed, resume=state)
    a, b = result.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run continues the history: no epoch repeated or lost
    assert [r.epoch for r in resumed.records] == [r.epoch for r in full.records if r.epoch > stop_after]
    assert len(again.history) == len(result.history)
    assert all(r.restarts == 1 for r in resumed.records)
    assert all(r["restarts"] == 0 for r in again.history[: stop_after + 1])


def test_resume_with_another_input_model_is_refused(tiny_loaders, tmp_path):
    run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**{**CFG, "max_epochs": 4}), reporter=Watch(tmp_path))
    state = TrainingState.load(tmp_path / "epoch2")
    torch.manual_seed(1)
    with pytest.raises(ResumeError, match="different input model"):
        run_dg2pf(TinyNet(), tiny_loaders, DG2PFConfig(**CFG), resume=state)


def test_unreadable_training_checkpoint(tmp_path):
    (tmp_path / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="cannot read"):
        TrainingState.load(tmp_path)
    with pytest.raises(ResumeError, match="no training checkpoint"):
        TrainingState.load(tmp_path / "missing")


@pytest.mark.parametrize(
    "override, field",
    [
        ({"sparsity": 0.0}, "sparsity"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"recovery": "magic"}, "recovery"),
        ({"schedule": "exp"}, "schedule"),
        ({"kd_alpha": 2.0}, "kd_alpha"),
        ({"max_epochs": 2}, "max_epochs"),
        ({"include": ["("]}, "include"),
        ({"patience": 0}, "patience"),
        ({"gradual_masks": "soft"}, "gradual_masks"),
        ({"max_layer_sparsity": 0.7}, "max_layer_sparsity"),
        ({"max_layer_sparsity": 1.2}, "max_layer_sparsity"),
        ({"bn_recalibration_batches": -1}, "bn_recalibration_batches"),
        ({"layer_density_floor": 1.0}, "layer_density_floor"),
        ({"layer_density_floor": -0.1}, "layer_density_floor"),
        ({"granularity": "2:4"}, "granularity"),
        ({"granularity": "4:2"}, "granularity"),
        ({"granularity": "1:5", "scope": "layerwise"}, "scope"),
    ],
)
def test_config_validation_names_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        DG2PFConfig(**{**CFG, **override})
    assert info.value.field == field


def test_hard_gradual_masks_and_the_layer_cap(tiny_loaders):
    """The ablation: pruned weights are 0 after every step from the first pruning epoch on (no weight
    recovery), and the cap holds at every ranking while the global target is exact."""
    model = _model()
    seen: list[dict[str, float]] = []

    class HardWatch(Watch):
        def __call__(self, record, state):
            super().__call__(record, state)
            if state.masks:
                seen.append({k: float(m.float().mean()) for k, m in state.masks.items()})

        def batch(self, loss):
            params = select_prunable(model).params
            for name, mask in (self.masks or {}).items():
                assert (params[name][mask] == 0).all()

    w = HardWatch()
    cfg = DG2PFConfig(**{**CFG, "gradual_masks": "hard", "max_layer_sparsity": 0.81, "max_epochs": 6})
    result = run_dg2pf(model, tiny_loaders, cfg, reporter=w, progress=w)
    assert seen and all(max(layers.values()) <= 0.81 for layers in seen)
    params = select_prunable(result.model).params
    n = sum(p.numel() for p in params.values())
    assert sum(int(m.sum()) for m in result.masks.values()) == round(0.8 * n)
    # fc1 holds most weights and would take more than 81% under a plain ranking; here it stops at 81%
    plain = run_dg2pf(
        _model(),
        tiny_loaders,
        DG2PFConfig(**{**CFG, "max_layer_sparsity": 1.0, "layer_density_floor": 0.0, "max_epochs": 3}),
    )
    assert float(plain.masks["fc1.weight"].float().mean()) > 0.81


def test_weight_recovery_is_counted_per_pruning_epoch(tiny_loaders):
    """Each pruning epoch's record says how many weights the previous ranking pruned and this one kept:
    none with hard masks (a zeroed weight cannot outrank a live one), some with feedback recovery."""
    hard = Watch()
    run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**{**CFG, "gradual_masks": "hard", "max_epochs": 4}), reporter=hard)
    assert [r.recovered for r in hard.records if r.phase == "gradual_pruning"] == [0, 0, 0]
    fed = Watch()
    run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**{**CFG, "recovery": "feedback", "max_epochs": 4}), reporter=fed)
    pruning = [i for i, r in enumerate(fed.records) if r.phase == "gradual_pruning"]
    expected = [recovered(fed.mask_history[i - 1], fed.mask_history[i]) for i in pruning]
    assert [fed.records[i].recovered for i in pruning] == expected and expected[0] == 0 and sum(expected) > 0
    assert all(r.recovered is None for r in fed.records if r.phase != "gradual_pruning")


def test_no_distillation_never_runs_the_teacher(tiny_loaders):
    teacher = _model()
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    result = run_dg2pf(
        _model(), tiny_loaders, DG2PFConfig(**{**CFG, "kd_alpha": 0.0, "max_epochs": 5}), teacher=teacher
    )
    assert calls == [] and result.epochs == 5


def test_batchnorm_recalibration_in_the_loop(tiny_loaders):
    result = run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**{**CFG, "bn_recalibration_batches": 2, "max_epochs": 5}))
    params = select_prunable(result.model).params
    n = sum(p.numel() for p in params.values())
    assert sum(int(m.sum()) for m in result.masks.values()) == round(0.8 * n)
    assert torch.isfinite(result.model.bn.running_var).all() and result.model.bn.momentum == 0.1


def test_batchnorm_re_estimation_changes_what_validation_measures_not_what_training_sees(tiny_loaders):
    """Train-mode BatchNorm never reads the running averages, and the re-estimation's batches come
    from a fork of the random generators: every epoch's training loss is the same with it or without."""
    runs = [
        run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**{**CFG, "bn_recalibration_batches": n, "max_epochs": 4}))
        for n in (0, 2)
    ]
    losses = [[r["train_loss"] for r in result.history] for result in runs]
    assert losses[0] == losses[1]
    assert [r["val_top1"] for r in runs[0].history][0] == [r["val_top1"] for r in runs[1].history][
        0
    ]  # the baseline: not re-estimated


def test_frozen_batchnorm_after_pruning_trains_on_the_statistics_the_served_network_uses(tiny_loaders):
    """bn_after_pruning="frozen": after the last ranking no training step touches BatchNorm's running
    statistics (with re-estimation off they stay exactly as the last pruning epoch left them), while
    the network still trains; "batch" (the default) keeps updating them."""

    def buffers_per_epoch(mode: str) -> tuple[list[dict], list[dict]]:
        states, records = [], []

        def keep(record, state):
            records.append(record.to_dict())
            states.append(
                {
                    k: v.clone()
                    for k, v in state.model.items()
                    if k.startswith("bn.running_") or k == "bn.num_batches_tracked"
                }
            )

        run_dg2pf(
            _model(),
            tiny_loaders,
            DG2PFConfig(
                **{**CFG, "bn_recalibration_batches": 0, "patience": 1, "max_epochs": 7, "bn_after_pruning": mode}
            ),
            reporter=keep,
        )
        return states, records

    frozen, records = buffers_per_epoch("frozen")
    last_pruning = max(i for i, r in enumerate(records) if r["phase"] == "gradual_pruning")
    after = range(last_pruning + 1, len(records))
    assert {records[i]["phase"] for i in after} == {"distillation", "finetuning"}  # both phases are covered
    for i in after:
        assert all(torch.equal(frozen[i][k], frozen[last_pruning][k]) for k in frozen[i]), records[i]["phase"]
    assert not torch.equal(
        frozen[last_pruning]["bn.running_mean"], frozen[0]["bn.running_mean"]
    )  # before: ordinary training
    assert len({round(r["train_loss"], 6) for r in (records[i] for i in after)}) > 1  # the weights still train
    batch, _ = buffers_per_epoch("batch")
    assert not torch.equal(batch[-1]["bn.running_mean"], batch[last_pruning]["bn.running_mean"])
    with pytest.raises(ConfigError, match="bn_after_pruning"):
        DG2PFConfig(**{**CFG, "bn_after_pruning": "eval"})


def test_the_density_floor_caps_each_ranking_relative_to_its_own_target(tiny_loaders):
    """Every tensor keeps at least floor x the network's density at every pruning epoch; the global
    target is still exact."""
    floor = 0.95
    cfg = DG2PFConfig(**{**CFG, "layer_density_floor": floor, "max_epochs": 5})
    assert cfg.layer_cap(0.8) == pytest.approx(0.81) and cfg.layer_cap(0.4) == pytest.approx(0.43)
    assert (
        DG2PFConfig(**{**CFG, "layer_density_floor": 0.2, "max_layer_sparsity": 0.99}).layer_cap(0.98) == 0.99
    )  # the cap still holds
    w = Watch()
    model = _model()
    w.model = model
    result = run_dg2pf(model, tiny_loaders, cfg, reporter=w, progress=w)
    pruning = [r for r in w.records if r.phase == "gradual_pruning"]
    assert len(pruning) == 3
    for record, masks in zip(pruning, w.mask_history[1:4]):
        assert max(float(m.float().mean()) for m in masks.values()) <= 1.0 - floor * (1.0 - record.sparsity) + 1e-6
    # a plain ranking prunes fc1 beyond 81% at 80% (test_hard_gradual_masks_and_the_layer_cap): the floor bound it
    assert float(result.masks["fc1.weight"].float().mean()) <= 0.81 + 1e-6
    params = select_prunable(result.model).params
    assert sum(int(m.sum()) for m in result.masks.values()) == round(0.8 * sum(p.numel() for p in params.values()))


def test_reranking_every_k_steps_changes_the_mask_only_at_those_steps_and_counts_each_ranking(
    tiny_loaders, monkeypatch
):
    """rerank_every_steps=k: inside a pruning epoch the mask is ranked again before steps k, 2k, ...
    at the epoch's target and nowhere else; the epoch's record lists what each ranking recovered
    (the first against the previous epoch's last mask) and sums it."""
    import dg2pf_core.algorithm.loop as loop
    from dg2pf_core.algorithm.masks import masks_checksum

    seen: list[tuple[int, dict]] = []  # (step within the epoch, the mask the step trained with)
    real = loop.simulated_step
    steps = {"n": 0}

    def spy(compute, optimizer, params, masks, **kw):
        seen.append((steps["n"], {k: v.clone() for k, v in masks.items()}))
        steps["n"] += 1
        return real(compute, optimizer, params, masks, **kw)

    class Epochs(Watch):
        def start_epoch(self, phase, epoch, sparsity, batches):
            steps["n"] = 0
            seen.append((-1, {}))  # an epoch boundary

    monkeypatch.setattr(loop, "simulated_step", spy)
    w = Epochs()
    cfg = DG2PFConfig(**{**CFG, "recovery": "feedback", "rerank_every_steps": 2, "max_epochs": 4})
    run_dg2pf(_model(), tiny_loaders, cfg, reporter=w, progress=w)
    epochs, current = [], None
    for step, masks in seen:
        if step == -1:
            current = []
            epochs.append(current)
        else:
            current.append(masks)
    epochs = [e for e in epochs if e]  # the distillation epoch takes no simulated step
    pruning = [r for r in w.records if r.phase == "gradual_pruning"]
    assert len(epochs) == len(pruning) == 3 and all(len(e) == 6 for e in epochs)  # 96 images / 16
    previous = {}
    for record, masks in zip(pruning, epochs):
        for step in range(1, 6):
            if step % 2:  # no ranking before odd steps: the very same mask
                assert masks_checksum(masks[step]) == masks_checksum(masks[step - 1])
                assert all(torch.equal(masks[step][k], masks[step - 1][k]) for k in masks[step])
        rankings = [masks[0], masks[2], masks[4]]
        expected = [recovered(previous, rankings[0])] + [recovered(a, b) for a, b in zip(rankings, rankings[1:])]
        assert record.rankings == 3 and record.recovered_per_ranking == expected and record.recovered == sum(expected)
        total = sum(p.numel() for p in select_prunable(_model()).params.values())
        assert all(
            sum(int(m.sum()) for m in r.values()) == round(record.sparsity * total) for r in rankings
        )  # the epoch's target
        previous = masks[5]
    assert sum(r.recovered for r in pruning) > 0  # feedback lets pruned weights grow back between rankings
    assert w.records[-1].rankings is None  # only pruning epochs rank
    with pytest.raises(ConfigError, match="rerank_every_steps"):
        DG2PFConfig(**{**CFG, "rerank_every_steps": 2, "gradual_masks": "hard"})


def test_the_paper_preset_is_the_listed_configuration_and_a_job_value_wins():
    """preset 'paper': the paper's algorithm with the authors' hyperparameters; the fields a preset lists
    take its values unless given; the default preset is DG2PFConfig's documented table."""
    from dg2pf_contract.options import PRESET_FIELDS, PRESETS

    paper = DG2PFConfig(sparsity=0.9, preset="paper")
    assert {k: getattr(paper, k) for k in PRESET_FIELDS} == PRESETS["paper"]
    assert (
        paper.schedule,
        paper.lr,
        paper.weight_decay,
        paper.kd_loss,
        paper.kd_temperature,
        paper.kd_alpha,
        paper.recovery,
        paper.rerank_every_steps,
        paper.max_layer_sparsity,
        paper.layer_density_floor,
        paper.grad_clip,
    ) == ("linear", 1e-5, 0.0, "authors", 4.0, 0.75, "feedback", 0, 1.0, 0.0, 0.5)
    assert (paper.min_weights_per_tensor, paper.min_weights_per_class) == (1, 1)  # only the emptying guard
    assert paper.preset_departures() == {}
    mine = DG2PFConfig(sparsity=0.9, preset="paper", lr=3e-4)
    assert mine.lr == 3e-4 and mine.kd_loss == "authors" and mine.preset_departures() == {"lr": 3e-4}
    default = DG2PFConfig(sparsity=0.9)
    assert default.preset == "default" and {k: getattr(default, k) for k in PRESET_FIELDS} == PRESETS["default"]
    assert DG2PFConfig.from_dict(paper.to_dict()) == paper  # a stored config reads back the same
    with pytest.raises(ConfigError, match="preset") as info:
        DG2PFConfig(sparsity=0.9, preset="fast")
    assert info.value.field == "preset"


def test_an_input_model_near_chance_is_named_before_training_and_refused_on_request(tiny_loaders):
    """An untrained TinyNet scores about chance (25% for 4 classes) on its validation split: the result says
    so; with chance_baseline='refuse' the run stops after the baseline, before any epoch trains and before
    anything is reported (saved): there is no state to resume, as there is nothing to continue."""
    torch.manual_seed(3)
    dead = TinyNet()
    with torch.no_grad():
        dead.fc2.weight.zero_()
        dead.fc2.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # one class for every input: exactly 25% here
    result = run_dg2pf(dead, tiny_loaders, DG2PFConfig(**{**CFG, "max_epochs": 3}))
    assert len(result.warnings) == 1 and "near chance (25.00% for 4 classes)" in result.warnings[0]
    records = []
    with pytest.raises(DG2PFError, match="chance_baseline is 'refuse'") as info:
        run_dg2pf(
            dead,
            tiny_loaders,
            DG2PFConfig(**{**CFG, "max_epochs": 3, "chance_baseline": "refuse"}),
            reporter=lambda record, state: records.append(record),
        )
    assert info.value.field == "checkpoint" and records == []
    healthy = run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**{**CFG, "max_epochs": 3}))
    assert healthy.warnings == [] or healthy.baseline_val_top1 <= 30.0


def test_a_state_save_on_a_full_disk_says_so_and_keeps_the_previous_state(tiny_loaders, tmp_path, monkeypatch):
    import errno

    from dg2pf_core.algorithm import state as state_module

    run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**{**CFG, "max_epochs": 3}), reporter=Watch(tmp_path))
    saved = TrainingState.load(tmp_path / "epoch2")
    saved.save(tmp_path / "keep")
    before = (tmp_path / "keep" / "train_state.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, fh):  # some bytes land, then the device is full (as /dev/full or a filled tmpfs)
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module.torch, "save", full_disk)
    with pytest.raises(OSError) as failed:
        saved.save(tmp_path / "keep")
    monkeypatch.setattr(state_module.torch, "save", real_save)
    assert failed.value.errno == errno.ENOSPC
    assert (tmp_path / "keep" / "train_state.pt").read_bytes() == before  # the previous state is intact
    assert not list((tmp_path / "keep").glob("*.tmp"))  # no half-written file left behind
