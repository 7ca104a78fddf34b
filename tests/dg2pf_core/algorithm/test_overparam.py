"""Linear over-parameterized fine-tuning: expansion keeps the function, the mask is honoured, collapse
gives back the input model's keys and shapes, similarity-preserving distillation, resume."""

from __future__ import annotations

import pytest
import torch
from tiny import TinyNet
from torch import nn

from dg2pf_core import DG2PFConfig, TrainingState, run_dg2pf
from dg2pf_core.algorithm.distillation import FeatureTaps, similarity_blocks, similarity_loss
from dg2pf_core.algorithm.masks import magnitude_masks, select_prunable
from dg2pf_core.algorithm.overparam import (
    ExpandedConv2d,
    ExpandedLinear,
    collapse,
    collapsed_state_dict,
    expand,
    is_expanded,
)
from dg2pf_core.models import build_model

CFG = dict(
    sparsity=0.8,
    pruning_epochs=3,
    patience=2,
    max_epochs=16,
    batch_size=16,
    lr=5e-3,
    finetune_lr=1e-2,
    seed=0,
    finetune="overparam",
    overparam_expansion=3,
    sp_weight=100.0,
)


class Odd(nn.Module):
    """Conv hyperparameters the composition must respect: stride, dilation, bias, reflect padding,
    a grouped convolution (left unexpanded) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2, bias=True)
        self.b = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.c = nn.Conv2d(6, 5, (1, 3), padding=(0, 1), padding_mode="reflect")
        self.fc = nn.Linear(5 * 4 * 4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.relu(self.c(self.b(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def _pruned(model: nn.Module, sparsity: float):
    params = select_prunable(model).params
    masks = magnitude_masks(params, sparsity, "global")
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(mask, 0.0)
    return masks


@pytest.mark.parametrize(
    "make, shape", [(Odd, (4, 3, 15, 15)), (lambda: build_model("digits_cnn", 10), (8, 1, 16, 16))]
)
def test_expansion_keeps_the_function_and_collapse_gives_back_the_input_layers(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    masks = _pruned(model, 0.9)
    x = torch.randn(*shape)
    before, keys = model(x), {k: v.shape for k, v in model.state_dict().items()}
    names = expand(model, masks, factor=4)
    assert is_expanded(model) and names
    assert "b" not in names  # grouped convolution left as it is
    assert all(isinstance(model.get_submodule(n), (ExpandedConv2d, ExpandedLinear)) for n in names)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    assert {k: v.shape for k, v in collapsed_state_dict(model).items()} == keys
    collapse(model)
    assert not is_expanded(model) and {k: v.shape for k, v in model.state_dict().items()} == keys
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)


def test_training_the_chains_never_revives_a_pruned_weight():
    torch.manual_seed(0)
    model = TinyNet()
    masks = _pruned(model, 0.8)
    expand(model, masks, factor=2)
    chains = [p for p in model.parameters()]
    opt = torch.optim.SGD(chains, lr=0.5, momentum=0.9)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 4
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    expanded_logits = model(x)
    collapse(model)
    params = select_prunable(model).params
    for name, mask in masks.items():
        assert (params[name][mask] == 0).all(), name  # exactly 0 where pruned
        assert (params[name][~mask] != 0).any(), name  # and it did train
    pruned = sum(int(m.sum()) for m in masks.values())
    assert sum(int((p == 0).sum()) for p in params.values()) == pruned
    torch.testing.assert_close(model(x), expanded_logits, rtol=1e-4, atol=1e-6)


def test_similarity_loss():
    torch.manual_seed(0)
    f = torch.randn(8, 4, 3, 3)
    assert similarity_loss(f, f.clone()) == 0
    assert similarity_loss(f, 5 * f) < 1e-12  # rows of G are normalised: scale-free
    assert similarity_loss(f, torch.randn(8, 4, 3, 3)) > 0
    assert similarity_loss(f, torch.randn(8, 10)) > 0  # different widths compare: only b x b matters


def test_similarity_blocks_default_and_patterns():
    model = build_model("digits_cnn", 10)
    assert similarity_blocks(model, []) == ["features"]  # top-level blocks with weights, not the classifier
    assert similarity_blocks(model, [r"features\.[0-9]"]) == [f"features.{i}" for i in range(10)]
    taps = FeatureTaps(model, ["features"])
    model(torch.randn(2, 1, 16, 16))
    assert taps.outputs["features"].shape == (2, 128)
    taps.remove()


def test_overparam_run_keeps_sparsity_and_keys(tiny_loaders):
    torch.manual_seed(0)
    model = TinyNet()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    records = []
    result = run_dg2pf(model, tiny_loaders, DG2PFConfig(**CFG), reporter=lambda r, s: records.append(r))
    assert "finetuning" in [r.phase for r in records]
    assert {k: v.shape for k, v in result.model.state_dict().items()} == keys
    params = select_prunable(result.model).params
    n = sum(p.numel() for p in params.values())
    assert sum(int(m.sum()) for m in result.masks.values()) == round(0.8 * n)
    for name, mask in result.masks.items():
        assert (params[name][mask] == 0).all()
    assert all(r.sparsity == pytest.approx(0.8, abs=1e-3) for r in records if r.phase == "finetuning")


@pytest.mark.parametrize("phase", ["distillation", "finetuning"])
def test_overparam_resume_ends_with_the_same_weights(tiny_loaders, tmp_path, phase):
    states: list[tuple[int, str]] = []

    def save(record, state):
        state.save(tmp_path / f"epoch{record.epoch}")
        states.append((record.epoch, record.phase))

    torch.manual_seed(0)
    result = run_dg2pf(TinyNet(), tiny_loaders, DG2PFConfig(**CFG), reporter=save)
    stop = next(e for e, p in states if p == phase)
    assert stop < states[-1][0]
    torch.manual_seed(0)
    again = run_dg2pf(TinyNet(), tiny_loaders, DG2PFConfig(**CFG), resume=TrainingState.load(tmp_path / f"epoch{stop}"))
    a, b = result.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert len(again.history) == len(result.history)
