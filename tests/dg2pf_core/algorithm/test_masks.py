import pytest
import torch
import torchvision
from tiny import TinyNet

from dg2pf_core import DG2PFConfig
from dg2pf_core.algorithm.masks import (
    EmptyingGuard,
    Selection,
    classifier_weight,
    count_pruned,
    layer_caps,
    layer_sparsity,
    layer_warnings,
    layers_above,
    magnitude_masks,
    masks_checksum,
    recovered,
    select_prunable,
)
from dg2pf_core.errors import ConfigError


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(10, 7, generator=g),
        "b": torch.randn(3, 3, 3, 3, generator=g),
        "c": torch.randn(50, generator=g),
    }


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.333, 0.5, 0.9, 0.95, 0.999])
def test_global_mask_prunes_exactly_round_s_n(sparsity):
    w = _weights()
    n = sum(t.numel() for t in w.values())
    masks = magnitude_masks(w, sparsity)
    assert sum(int(m.sum()) for m in masks.values()) == round(sparsity * n)
    assert all(m.shape == w[k].shape and m.dtype == torch.bool for k, m in masks.items())


def test_global_mask_prunes_the_globally_smallest_magnitudes():
    w = _weights(1)
    flat = torch.cat([t.abs().flatten() for t in w.values()])
    k = round(0.6 * flat.numel())
    threshold = flat.sort().values[k - 1]
    masks = magnitude_masks(w, 0.6)
    for name, t in w.items():
        assert torch.equal(masks[name], t.abs() <= threshold)


def test_ties_are_broken_by_position_deterministically():
    w = {"a": torch.ones(10), "b": torch.ones(10)}
    masks = magnitude_masks(w, 0.25)  # 5 of 20 equal magnitudes
    assert masks["a"].tolist() == [True] * 5 + [False] * 5
    assert not masks["b"].any()
    # Ties in the middle: values below the threshold all go, then the first ties in flat order.
    w = {"a": torch.tensor([3.0, 1.0, 2.0, 2.0, -2.0, 5.0])}
    m = magnitude_masks(w, 0.5)["a"]  # 3 pruned: 1.0, then the first two |2.0|
    assert m.tolist() == [False, True, True, True, False, False]
    assert masks_checksum(magnitude_masks(w, 0.5)) == masks_checksum(magnitude_masks(w, 0.5))


def test_layerwise_prunes_each_tensor_to_the_target():
    w = _weights(2)
    masks = magnitude_masks(w, 0.7, scope="layerwise")
    for name, t in w.items():
        assert int(masks[name].sum()) == round(0.7 * t.numel())
        kept_min = t.abs()[~masks[name]].min()
        assert (t.abs()[masks[name]] <= kept_min).all()


def test_default_selection_is_conv_and_linear_weights():
    names = select_prunable(TinyNet()).names()
    assert names == ["conv.weight", "fc1.weight", "fc2.weight"]  # no biases, no BatchNorm


def test_keep_classifier_dense_and_name_patterns():
    model = TinyNet()
    assert select_prunable(model, Selection(keep_classifier_dense=True)).names() == ["conv.weight", "fc1.weight"]
    assert select_prunable(model, Selection(exclude=("^conv",))).names() == ["fc1.weight", "fc2.weight"]
    assert select_prunable(model, Selection(include=("fc",), exclude=("fc2",))).names() == ["fc1.weight"]
    with pytest.raises(ConfigError, match="no prunable weights"):
        select_prunable(model, Selection(include=("nothing-matches",)))
    with pytest.raises(ConfigError, match="invalid name pattern"):
        Selection(include=("(",))


def test_excluded_layers_stay_dense_while_global_target_holds():
    model = TinyNet()
    params = select_prunable(model, Selection(keep_classifier_dense=True)).params
    masks = magnitude_masks(params, 0.8)
    assert "fc2.weight" not in masks
    n = sum(p.numel() for p in params.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.8 * n)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_invalid_sparsity_is_refused(bad):
    with pytest.raises(ConfigError, match="sparsity"):
        magnitude_masks(_weights(), bad)


# --- layer collapse: the per-layer cap ---


def _greedy_under_caps(w: dict[str, torch.Tensor], k: int, caps: dict[str, int]) -> dict[str, torch.Tensor]:
    """Reference: walk all weights from the smallest magnitude up (ties by position), taking each one
    whose tensor is still under its cap, until k are taken."""
    entries = sorted(
        ((float(v), i, name) for name, t in w.items() for i, v in enumerate(t.abs().flatten().tolist())),
        key=lambda e: (e[0], list(w).index(e[2]), e[1]),
    )
    masks = {name: torch.zeros(t.numel(), dtype=torch.bool) for name, t in w.items()}
    taken = dict.fromkeys(w, 0)
    for _, i, name in entries:
        if k == 0:
            break
        if taken[name] < caps[name]:
            masks[name][i] = True
            taken[name] += 1
            k -= 1
    return {name: m.view_as(w[name]) for name, m in masks.items()}


def test_plain_global_ranking_can_empty_a_layer_and_the_cap_prevents_it():
    g = torch.Generator().manual_seed(0)
    # A layer of small weights (think: a wide 1x1 conv whose init scale is 1/sqrt(fan_in)).
    w = {"big": torch.randn(200, generator=g), "small": torch.randn(40, generator=g) * 1e-3}
    plain = magnitude_masks(w, 0.5)
    assert bool(plain["small"].all()), "plain global ranking prunes the whole small layer"
    capped = magnitude_masks(w, 0.5, max_layer_sparsity=0.9)
    assert int(capped["small"].sum()) == 36  # floor(0.9 * 40): 4 weights survive
    assert count_pruned(capped) == count_pruned(plain) == 120  # the global target is still exact
    # the 4 weights "small" keeps are its largest; "big" gives up its 4 next-smallest instead
    kept = w["small"].abs()[~capped["small"]]
    assert kept.min() >= w["small"].abs()[capped["small"]].max()
    assert int(capped["big"].sum()) == int(plain["big"].sum()) + 4


@pytest.mark.parametrize(
    "seed, sparsity, cap", [(0, 0.6, 0.7), (1, 0.9, 0.92), (2, 0.95, 0.95), (3, 0.5, 0.55), (4, 0.8, 0.99)]
)
def test_capped_masks_are_the_smallest_weights_under_the_caps(seed, sparsity, cap):
    g = torch.Generator().manual_seed(seed)
    # Scales differing per tensor, so a plain ranking would overfill the small-scale ones.
    w = {
        "a": torch.randn(30, 7, generator=g) * 0.01,
        "b": torch.randn(3, 3, 3, 3, generator=g),
        "c": torch.randn(50, generator=g) * 0.1,
        "d": torch.randn(11, generator=g) * 1e-4,
    }
    n = sum(t.numel() for t in w.values())
    k = round(sparsity * n)
    masks = magnitude_masks(w, sparsity, max_layer_sparsity=cap)
    assert count_pruned(masks) == k
    caps = layer_caps(w, cap, k)
    assert all(int(masks[name].sum()) <= caps[name] for name in w)
    reference = _greedy_under_caps(w, k, caps)
    assert all(torch.equal(masks[name], reference[name]) for name in w)


def test_cap_equal_to_the_target_rounds_up_by_at_most_one_weight():
    w = {name: torch.randn(n) for name, n in (("a", 7), ("b", 13), ("c", 101))}
    masks = magnitude_masks(w, 0.9, max_layer_sparsity=0.9)
    assert count_pruned(masks) == round(0.9 * 121)
    assert all(int(m.sum()) <= int(0.9 * m.numel()) + 1 for m in masks.values())


def test_a_cap_below_the_target_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="raise max_layer_sparsity") as info:
        magnitude_masks(_weights(), 0.9, max_layer_sparsity=0.8)
    assert info.value.field == "max_layer_sparsity"


def test_shufflenet_at_95_percent_under_the_old_density_floor_is_exact_with_no_layer_above_its_cap():
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    params = select_prunable(model).params
    n = sum(p.numel() for p in params.values())
    cap = DG2PFConfig(sparsity=0.95, preset="paper", max_layer_sparsity=0.99, layer_density_floor=0.6).layer_cap(0.95)
    assert cap == pytest.approx(0.97)
    plain = layer_sparsity(magnitude_masks(params, 0.95))
    assert sum(s == 1.0 for s in plain.values()) >= 5, "the case a guard exists for: plain ranking empties layers"
    masks = magnitude_masks(params, 0.95, max_layer_sparsity=cap)
    assert count_pruned(masks) == round(0.95 * n)
    assert max(layer_sparsity(masks).values()) <= cap
    assert layers_above(masks, cap) == {}
    warnings = layer_warnings(magnitude_masks(params, 0.95), 0.98)
    assert len(warnings) == 1 and "entirely pruned" in warnings[0] and "max_layer_sparsity" in warnings[0]


@pytest.mark.parametrize("arch", ["shufflenet_v2_x0_5", "mobilenet_v2"])
def test_the_emptying_guard_keeps_every_tensor_and_every_class_at_99_9_percent_with_the_target_exact(arch):
    """At 99.9% a plain global ranking empties many tensors and classifier rows; the default guard
    keeps the largest weight of each tensor and of each class's row, and nothing else changes: the
    count is exact and everything the guard does not keep is ranked as before."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    params = select_prunable(model).params
    n = sum(p.numel() for p in params.values())
    classifier = classifier_weight(model)
    assert classifier in params and params[classifier].shape[0] == 10
    plain = magnitude_masks(params, 0.999)
    assert sum(bool(m.all()) for m in plain.values()) >= 5
    assert bool(plain[classifier].all(dim=1).any()), "a plain ranking cuts off some class"
    cfg = DG2PFConfig(sparsity=0.999, max_layer_sparsity=1.0, layer_density_floor=0.0)
    guard = EmptyingGuard(cfg.min_weights_per_tensor, cfg.min_weights_per_class, classifier)
    kept = guard.kept(params)
    masks = magnitude_masks(params, 0.999, keep=kept)
    assert count_pruned(masks) == round(0.999 * n)
    assert not any(bool(m.all()) for m in masks.values())
    assert not bool(masks[classifier].all(dim=1).any())
    for name, w in params.items():  # the kept weight of a tensor is its largest
        assert not masks[name].view(-1)[w.detach().abs().argmax()]
    # outside the kept weights, the pruned set is the smallest magnitudes
    kept_flat = torch.cat([kept.get(k, torch.zeros_like(m)).flatten() for k, m in masks.items()])
    mags = torch.cat([p.detach().abs().flatten() for p in params.values()])
    pruned = torch.cat([m.flatten() for m in masks.values()])
    assert mags[pruned].max() <= mags[~pruned & ~kept_flat].min()


def test_the_guard_counts_are_minimums_and_a_target_beyond_them_is_refused():
    w = {"a": torch.arange(1.0, 11.0), "fc": torch.arange(1.0, 13.0).view(3, 4)}
    guard = EmptyingGuard(per_tensor=2, per_class=1, classifier="fc")
    kept = guard.kept(w)
    assert kept["a"].tolist() == [False] * 8 + [True] * 2  # the two largest
    # the largest of each row, and the tensor's two largest (both in the last row)
    assert kept["fc"].tolist() == [[False, False, False, True], [False, False, False, True], [False, False, True, True]]
    masks = magnitude_masks(w, 16 / 22, keep=kept)  # 16 of 22: exactly the 6 kept survive
    assert count_pruned(masks) == 16 and not (masks["a"] & kept["a"]).any() and not (masks["fc"] & kept["fc"]).any()
    with pytest.raises(ConfigError, match="emptying guard") as info:
        magnitude_masks(w, 17 / 22, keep=kept)  # 17 > 22 - 6
    assert info.value.field == "sparsity"
    assert (
        not EmptyingGuard(0, 0, "fc").active
        and EmptyingGuard(0, 1, "fc").active
        and not EmptyingGuard(0, 1, None).active
    )
    # layerwise: a tensor keeps its guarded weights too; capped rankings too
    assert int(magnitude_masks(w, 0.95, scope="layerwise", keep=kept)["a"].sum()) == 8
    capped = magnitude_masks(w, 0.5, max_layer_sparsity=0.9, keep=kept)
    assert count_pruned(capped) == 11 and not (capped["fc"] & kept["fc"]).any()


def test_rounding_up_to_meet_the_target_never_empties_a_small_tensor():
    # Ten-weight tensors under a 0.99 cap: floor leaves 9 each (90%), short of a 95% target. Rounding
    # up would empty them; the target cannot be met without emptying layers, so it is refused.
    w = {f"t{i}": torch.randn(10) for i in range(5)}
    assert all(c == 9 for c in layer_caps(w, 0.99, round(0.95 * 50)).values())
    with pytest.raises(ConfigError, match="max_layer_sparsity"):
        magnitude_masks(w, 0.95, max_layer_sparsity=0.99)


def test_recovered_counts_weights_pruned_before_and_kept_now():
    before = {"a": torch.tensor([True, True, False, False]), "b": torch.tensor([True])}
    after = {"a": torch.tensor([False, True, True, True]), "b": torch.tensor([False]), "c": torch.tensor([False])}
    assert recovered(before, after) == 2  # a[0] and b[0]; "c" was not ranked before
    assert recovered({}, after) == 0 and recovered(after, after) == 0
