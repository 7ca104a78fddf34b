"""Simulated pruning restores weights bit-exactly; the two recovery variants differ exactly as specified."""

import copy

import torch
import torch.nn.functional as F
from tiny import TinyNet, tiny_data

from dg2pf_core.algorithm.masks import magnitude_masks, select_prunable
from dg2pf_core.algorithm.simulated import hard_step, simulated_step


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyNet()
    params = select_prunable(model).params
    masks = magnitude_masks(params, 0.6)
    x, y = tiny_data(16).tensors
    return model, params, masks, x, y


def _loss(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def _grads_at_pruned_point(model, masks, x, y):
    """Reference gradient: a copy whose masked weights are 0, plain autograd."""
    ref = copy.deepcopy(model)
    ref_params = select_prunable(ref).params
    with torch.no_grad():
        for n, m in masks.items():
            ref_params[n].masked_fill_(m, 0.0)
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    return {n: p.grad.clone() for n, p in ref_params.items()}


def test_forward_sees_pruned_weights_and_frozen_restores_masked_bit_exactly():
    model, params, masks, x, y = _setup()
    before = {n: p.detach().clone() for n, p in params.items()}
    seen = {}

    def loss():
        seen.update({n: p.detach().clone() for n, p in params.items()})
        return F.cross_entropy(model(x), y)

    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    simulated_step(loss, opt, params, masks, recovery="frozen", clip_params=list(model.parameters()), clip_norm=0.5)
    for n, m in masks.items():
        assert (seen[n][m] == 0).all()  # zeroed for forward/backward
        assert torch.equal(params[n][m], before[n][m])  # bit-exact, despite weight decay and momentum
        assert not torch.equal(params[n][~m], before[n][~m])  # unpruned weights did train


def test_recovery_variants_differ_exactly_as_specified():
    lr = 0.05
    model, params, masks, x, y = _setup(1)
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = _grads_at_pruned_point(model, masks, x, y)

    frozen = copy.deepcopy(model)
    fp = select_prunable(frozen).params
    simulated_step(
        _loss(frozen, x, y), torch.optim.SGD(frozen.parameters(), lr=lr), fp, masks, recovery="frozen", clip_params=[]
    )
    feedback = copy.deepcopy(model)
    bp = select_prunable(feedback).params
    simulated_step(
        _loss(feedback, x, y),
        torch.optim.SGD(feedback.parameters(), lr=lr),
        bp,
        masks,
        recovery="feedback",
        clip_params=[],
    )

    for n, m in masks.items():
        expected = before[n] - lr * grads[n]  # gradient at the pruned point, applied densely
        # feedback: every weight, masked ones included, takes the step
        torch.testing.assert_close(bp[n], expected, rtol=0, atol=1e-6)
        # frozen: unpruned weights take the same step, masked weights keep their value exactly
        torch.testing.assert_close(fp[n][~m], expected[~m], rtol=0, atol=1e-6)
        assert torch.equal(fp[n][m], before[n][m])
        assert not torch.equal(bp[n][m], before[n][m])


def test_hard_step_keeps_pruned_weights_exactly_zero():
    model, params, masks, x, y = _setup(2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    # Momentum from dense steps would move pruned weights if nothing stopped it.
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for _ in range(5):
        hard_step(_loss(model, x, y), opt, params, masks, clip_params=list(model.parameters()), clip_norm=0.5)
        for n, m in masks.items():
            assert (params[n][m] == 0).all()
