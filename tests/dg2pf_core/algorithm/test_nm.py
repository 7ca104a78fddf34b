"""N:M granularity: at most N of every M consecutive input channels kept (per output and kernel tap), reached on
DG2PF's schedule."""

import json

import pytest
import torch
from tiny import TinyNet

from dg2pf_core import DG2PFConfig, TrainingState, run_dg2pf
from dg2pf_core.algorithm import overparam
from dg2pf_core.algorithm.masks import masks_checksum, select_prunable
from dg2pf_core.algorithm.nm import NM, check_divisible, nm_masks, nm_violations, parse_granularity
from dg2pf_core.errors import ConfigError

# TinyNet's conv has 1 input channel, which no M > 1 divides: left out.
CFG = dict(
    sparsity=0.5,
    granularity="2:4",
    exclude=["^conv"],
    pruning_epochs=3,
    patience=2,
    max_epochs=6,
    batch_size=16,
    lr=5e-3,
    finetune_lr=1e-2,
    seed=0,
)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # A Conv (8 input channels per tap), a Linear (rows of 32) and a 1x1 Conv (16 input channels).
    return {
        "conv": torch.randn(6, 8, 3, 3, generator=g),
        "fc": torch.randn(10, 32, generator=g),
        "pw": torch.randn(4, 16, 1, 1, generator=g),
    }


def _layout(t: torch.Tensor, m: int) -> torch.Tensor:
    """The layout sparse tensor cores read (NVIDIA ASP), written out: for every output channel and kernel tap,
    the input channels in order, cut into groups of M: ``[groups, M]``."""
    if t.dim() == 4:
        out, cin, kh, kw = t.shape
        return torch.stack(
            [
                t[o, c0 : c0 + m, y, x]
                for o in range(out)
                for y in range(kh)
                for x in range(kw)
                for c0 in range(0, cin, m)
            ]
        )
    return t.reshape(-1, m)


def _per_group(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Pruned count of every group of the layout."""
    return _layout(mask, m).sum(dim=1)


def _reference(weights: dict[str, torch.Tensor], sparsity: float, nm: NM) -> dict[str, torch.Tensor]:
    """The rule written out plainly: each group's M-N smallest are candidates, the globally smallest
    round(s * total) candidates are pruned (groups in the layout's order, positions within them)."""
    candidates = []
    for name, w in weights.items():
        for g, group in enumerate(_layout(w.abs(), nm.m).tolist()):
            for j in sorted(range(nm.m), key=lambda j: (group[j], j))[: nm.m - nm.n]:
                candidates.append((group[j], name, g, j))
    k = round(sparsity * sum(w.numel() for w in weights.values()))
    chosen = {name: torch.zeros(w.numel() // nm.m, nm.m, dtype=torch.bool) for name, w in weights.items()}
    for _, name, g, j in sorted(candidates)[:k]:
        chosen[name][g, j] = True
    masks = {}
    for name, w in weights.items():  # back from the layout: mark each pruned weight where it sits in the tensor
        index = torch.arange(w.numel()).view_as(w)
        masks[name] = torch.zeros(w.numel(), dtype=torch.bool)
        masks[name][_layout(index, nm.m)[chosen[name]]] = True
        masks[name] = masks[name].view_as(w)
    return masks


@pytest.mark.parametrize(
    "text, nm", [("2:4", NM(2, 4)), ("1:4", NM(1, 4)), ("4:8", NM(4, 8)), ("31:32", NM(31, 32)), ("unstructured", None)]
)
def test_granularity_strings(text, nm):
    assert parse_granularity(text) == nm
    if nm is not None:
        assert DG2PFConfig(sparsity=nm.sparsity, granularity=text).nm() == nm


@pytest.mark.parametrize("text", ["2-4", "4:2", "2:2", "0:4", "2:64", "2:4\n", " 2:4", "", "N:M", "dense", 24, None])
def test_invalid_granularity_is_refused_naming_the_field(text):
    with pytest.raises(ConfigError) as info:
        DG2PFConfig(sparsity=0.5, granularity=text)
    assert info.value.field == "granularity" and "2:4" in info.value.message


def test_the_sparsity_must_be_the_pattern_s_and_the_message_gives_it():
    with pytest.raises(ConfigError, match=r"set sparsity to 0\.5 \(got 0\.9\)") as info:
        DG2PFConfig(sparsity=0.9, granularity="2:4")
    assert info.value.field == "granularity"
    with pytest.raises(ConfigError, match=r"set sparsity to 0\.875"):
        DG2PFConfig(sparsity=0.9, granularity="1:8")
    assert DG2PFConfig(sparsity=1 / 3, granularity="2:3").nm() == NM(2, 3)


def test_layer_caps_do_not_apply_and_the_layerwise_scope_is_refused():
    # every group is capped by construction: a cap below the target does not make the target unreachable
    assert DG2PFConfig(sparsity=0.75, granularity="1:4", max_layer_sparsity=0.5).nm() == NM(1, 4)
    with pytest.raises(ConfigError, match="leave scope 'global'") as info:
        DG2PFConfig(sparsity=0.5, granularity="2:4", scope="layerwise")
    assert info.value.field == "scope"


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(4, 8), NM(5, 8)])
def test_the_final_mask_prunes_exactly_m_minus_n_per_group_the_smallest(nm):
    w = _weights(1)
    masks = nm_masks(w, nm.sparsity, nm)
    for name, t in w.items():
        assert masks[name].dtype == torch.bool and masks[name].shape == t.shape
        assert (_per_group(masks[name], nm.m) == nm.m - nm.n).all()
        groups, pruned = _layout(t.abs(), nm.m), _layout(masks[name], nm.m)
        # within a group, every pruned weight is no larger than every kept one
        largest_pruned = groups.masked_fill(~pruned, -1).max(dim=1).values
        smallest_kept = groups.masked_fill(pruned, float("inf")).min(dim=1).values
        assert (largest_pruned <= smallest_kept).all()
    pruned_weights = {n: t.masked_fill(masks[n], 0) for n, t in w.items()}
    assert nm_violations(pruned_weights, nm) == 0


@pytest.mark.parametrize("sparsity", [0.0, 0.05, 1 / 6, 0.25, 1 / 3, 0.49, 0.5])
def test_gradual_targets_prune_the_global_smallest_under_the_group_cap(sparsity):
    w, nm = _weights(2), NM(2, 4)
    masks = nm_masks(w, sparsity, nm)
    total = sum(t.numel() for t in w.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(sparsity * total)
    assert all((_per_group(m, 4) <= 2).all() for m in masks.values())
    reference = _reference(w, sparsity, nm)
    assert all(torch.equal(masks[n], reference[n]) for n in w)


def test_the_cap_moves_pruning_to_other_groups_where_unstructured_would_not():
    # One group holds the 4 smallest weights: unstructured pruning would take them all, N:M only 2.
    w = {"fc": torch.tensor([[0.01, 0.02, 0.03, 0.04, 1.0, 2.0, 3.0, 4.0]])}
    masks = nm_masks(w, 0.375, NM(2, 4))  # 3 of 8
    assert masks["fc"].tolist() == [[True, True, False, False, True, False, False, False]]


def test_masks_are_bit_identical_across_calls_and_ties_go_by_position():
    w = _weights(3)
    a, b = nm_masks(w, 0.3, NM(2, 4)), nm_masks({n: t.clone() for n, t in w.items()}, 0.3, NM(2, 4))
    assert all(torch.equal(a[n], b[n]) for n in w) and masks_checksum(a) == masks_checksum(b)
    ones = {"a": torch.ones(2, 8), "b": torch.ones(1, 8)}
    masks = nm_masks(ones, 0.25, NM(2, 4))  # 6 of 24 equal magnitudes: the first candidates in order
    assert masks["a"].tolist() == [
        [True, True, False, False, True, True, False, False],
        [True, True, False, False, False, False, False, False],
    ]
    assert not masks["b"].any()


def test_hard_zeros_stay_pruned_and_no_group_goes_over_its_cap():
    """With hard gradual masks the weights pruned before are exactly 0: the next, higher target prunes
    them again (a zero is the smallest of its group) and never more than M-N per group."""
    w, nm = _weights(4), NM(2, 4)
    first = nm_masks(w, 0.2, nm)
    zeroed = {n: t.masked_fill(first[n], 0.0) for n, t in w.items()}
    second = nm_masks(zeroed, 0.4, nm)
    assert all((second[n] | ~first[n]).all() for n in w)  # everything pruned before is still pruned
    assert all((_per_group(m, 4) <= 2).all() for m in second.values())


def test_a_tensor_whose_rows_are_not_whole_groups_is_named_with_the_exclude_that_fixes_it():
    w = {
        "features.0.weight": torch.zeros(32, 1, 3, 3),
        "features.3.weight": torch.zeros(64, 32, 3, 3),
        "head.weight": torch.zeros(10, 6),
    }
    with pytest.raises(ConfigError) as info:
        check_divisible(w, NM(2, 4))
    message = info.value.message
    assert info.value.field == "granularity" and "\n" not in message
    assert (
        "features.0.weight (32x1x3x3: 1 input channel)" in message and "head.weight (10x6: 6 input channels)" in message
    )
    assert "features.3.weight" not in message and r"--exclude '^(features\.0\.weight|head\.weight)$'" in message
    check_divisible({"features.3.weight": w["features.3.weight"]}, NM(2, 4))
    meta = {n: torch.empty(t.shape, device="meta") for n, t in w.items()}  # shapes are all it reads
    with pytest.raises(ConfigError, match="features.0.weight"):
        check_divisible(meta, NM(1, 8))
    with pytest.raises(ConfigError, match="features.0.weight"):
        nm_masks(w, 0.5, NM(2, 4))


def test_a_conv_mask_has_at_most_n_of_every_m_input_channels_at_every_tap_and_the_old_layout_would_not():
    """The layout definition (NVIDIA ASP: groups along input channels, per output channel and kernel tap),
    checked directly on a 3x3 convolution. Rows of W.reshape(out, -1) (in, kh, kw order) grouped weights of
    one channel's taps instead: about a third of these groups held more than 2 nonzeros."""
    g = torch.Generator().manual_seed(5)
    w = {"conv": torch.randn(16, 32, 3, 3, generator=g)}
    mask = nm_masks(w, 0.5, NM(2, 4))["conv"]
    kept = (~mask).float()
    for o in range(16):
        for y in range(3):
            for x in range(3):
                assert (kept[o, :, y, x].reshape(-1, 4).sum(dim=1) == 2).all()
    assert nm_violations({"conv": w["conv"].masked_fill(mask, 0)}, NM(2, 4)) == 0
    # the same network pruned in the old layout holds groups of the new one with more than 2 nonzeros
    old = w["conv"].reshape(16, -1).abs().reshape(-1, 4).argsort(dim=1)[:, :2]
    old_mask = torch.zeros(16 * 32 * 9 // 4, 4, dtype=torch.bool).scatter_(1, old, True).view_as(w["conv"])
    assert nm_violations({"conv": w["conv"].masked_fill(old_mask, 0)}, NM(2, 4)) > 0


def test_nm_violations_counts_groups_over_n_nonzeros():
    w = {"fc": torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])}
    assert nm_violations(w, NM(2, 4)) == 2 and nm_violations(w, NM(3, 4)) == 1 and nm_violations(w, NM(4, 8)) == 1
    assert nm_violations(w, NM(5, 8)) == 0


class _Watch:
    def __init__(self, model):
        self.model, self.records, self.masks, self.phase = model, [], [], None

    def __call__(self, record, state):
        self.records.append(record)
        self.masks.append({k: v.clone() for k, v in state.masks.items()})

    def start_epoch(self, phase, epoch, sparsity, batches):
        self.phase = phase

    def batch(self, loss):
        if self.phase in ("distillation", "finetuning"):
            # an over-parameterized fine-tuning trains chains: what must stay pruned is their product
            params = overparam.collapsed_state_dict(self.model)
            for name, mask in self.masks[-1].items():
                assert (params[name][mask] == 0).all(), f"pruned weight of {name} nonzero in {self.phase}"

    def end_epoch(self, record):
        pass


@pytest.mark.parametrize(
    "override", [{}, {"gradual_masks": "hard"}, {"recovery": "feedback"}, {"finetune": "overparam"}]
)
def test_the_loop_reaches_n_m_gradually_and_ends_with_no_violation(tiny_loaders, override):
    torch.manual_seed(0)
    model = TinyNet()
    watch = _Watch(model)
    cfg = DG2PFConfig(**{**CFG, **override})
    result = run_dg2pf(model, tiny_loaders, cfg, reporter=watch, progress=watch)
    n = sum(m.numel() for m in result.masks.values())
    gradual = [i for i, r in enumerate(watch.records) if r.phase == "gradual_pruning"]
    # the linear schedule's targets, within one weight of rounding, and never over M-N per group
    assert [watch.records[i].sparsity for i in gradual] == pytest.approx([1 / 6, 1 / 3, 1 / 2], abs=1 / n)
    for i in gradual:
        assert set(watch.masks[i]) == {"fc1.weight", "fc2.weight"}
        assert all((_per_group(m, 4) <= 2).all() for m in watch.masks[i].values())
    assert all((_per_group(m, 4) == 2).all() for m in result.masks.values())
    params = select_prunable(result.model, cfg.selection()).params
    assert nm_violations(params, NM(2, 4)) == 0
    assert all(int((params[k] == 0).sum()) >= int(m.sum()) for k, m in result.masks.items())


@pytest.mark.parametrize("stop_after", [2, 4])
def test_resume_mid_run_ends_with_the_same_weights(tiny_loaders, tmp_path, stop_after):
    class Saver:
        def __call__(self, record, state):
            state.save(tmp_path / f"epoch{record.epoch}")

    torch.manual_seed(0)
    full = run_dg2pf(TinyNet(), tiny_loaders, DG2PFConfig(**CFG), reporter=Saver())
    state = TrainingState.load(tmp_path / f"epoch{stop_after}")
    torch.manual_seed(0)
    again = run_dg2pf(TinyNet(), tiny_loaders, DG2PFConfig(**CFG), resume=state)
    a, b = full.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(full.masks[k], again.masks[k]) for k in full.masks)


@pytest.mark.slow
def test_a_real_prune_on_the_digits_keeps_at_most_n_per_group_in_both_artifacts(digits_example, tmp_path, capsys):
    from dg2pf_cli.main import main
    from dg2pf_core.io.checkpoints import read_state_dict
    from dg2pf_core.models import build_model

    out = tmp_path / "pruned"
    argv = [
        "prune",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        str(digits_example / "model.safetensors"),
        "--dataset",
        "digits",
        "--sparsity",
        "0.5",
        "--granularity",
        "2:4",
        "--exclude",
        r"^features\.0\.weight$",
        "--out",
        str(out),
        "--pruning-epochs",
        "2",
        "--max-epochs",
        "3",
        "--patience",
        "1",
        "--quiet",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["granularity"] == "2:4" and metrics["nm_violations"] == 0 and metrics["layer_cap"] is None
    assert metrics["sparsity_prunable"] == 0.5
    assert metrics["test_top1"] >= metrics["baseline_test_top1"] - 5
    pruned = [k for k in select_prunable(build_model("digits_cnn", 10)).names() if k != "features.0.weight"]
    assert set(metrics["layer_sparsity"]) == set(pruned)
    for artifact in ("model.safetensors", "model.compact.safetensors"):
        state = read_state_dict(out / artifact)
        for name in pruned:
            nonzero = _layout(state[name], 4) != 0
            assert (nonzero.sum(dim=1) <= 2).all(), (artifact, name)
        assert int((state["features.0.weight"] == 0).sum()) == 0  # excluded: dense
