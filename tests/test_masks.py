import pytest
import torch

from dg2pf_core.errors import ConfigError
from dg2pf_core.masks import Selection, magnitude_masks, masks_checksum, select_prunable

from tiny import TinyNet


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(10, 7, generator=g), "b": torch.randn(3, 3, 3, 3, generator=g), "c": torch.randn(50, generator=g)}


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
