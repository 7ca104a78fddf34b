"""The exact update rules of simulated pruning (frozen / feedback recovery) and of hard pruning,
each checked against a step computed by hand, and the ``recovered`` counter they feed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dg2pf_core.algorithm.masks import magnitude_masks, recovered, select_prunable
from dg2pf_core.algorithm.simulated import hard_step, simulated_step

# One linear neuron y = w . x, loss 0.5 * (y - t)^2, one input; masks are True where PRUNED.
W0 = [0.5, -0.1, 2.0]
X = [1.0, 2.0, -0.5]
T = 1.0
LR = 0.25  # a power of two: the hand-computed updates below are exact in float64
PRUNED = [False, True, False]  # index 1 is pruned

# Hand computation at the pruned point (w[1] zeroed):
#   y = 0.5*1.0 + 0*2.0 + 2.0*(-0.5) = -0.5;  r = y - t = -1.5;  loss = 0.5 * r^2 = 1.125
#   g = r * x = [-1.5, -3.0, 0.75]
Y_PRUNED = 0.5 * 1.0 + 0.0 * 2.0 + 2.0 * -0.5
R = Y_PRUNED - T
LOSS = 0.5 * R * R
G = [R * X[0], R * X[1], R * X[2]]


def _neuron(weights, dtype=torch.float64):
    model = nn.Linear(len(weights), 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights], dtype=dtype))
    params = select_prunable(model).params  # {"weight": model.weight}
    return model, params


def _closure(model, x, t):
    x = torch.tensor([x], dtype=model.weight.dtype)
    return lambda: 0.5 * (model(x).squeeze() - t) ** 2


def _masks(pruned):
    return {"weight": torch.tensor([pruned])}


def _assert_weights(model, expected):
    torch.testing.assert_close(model.weight.detach(), torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-12)


def test_hand_computed_values():
    assert (Y_PRUNED, R, LOSS, G) == (-0.5, -1.5, 1.125, [-1.5, -3.0, 0.75])


def test_frozen_updates_only_unpruned_and_keeps_masked_bit_exact():
    """frozen: unpruned weights take w - lr*g (g at the pruned point); pruned ones keep their exact value."""
    model, params = _neuron(W0)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = simulated_step(
        _closure(model, X, T), opt, params, _masks(PRUNED), recovery="frozen", clip_params=list(model.parameters())
    )
    assert loss.item() == LOSS
    _assert_weights(model, [W0[0] - LR * G[0], W0[1], W0[2] - LR * G[2]])  # [0.875, -0.1, 1.8125]
    assert torch.equal(model.weight.detach()[0, 1], before[0, 1])


def test_feedback_updates_all_weights_from_their_restored_values():
    """feedback: every weight, pruned ones included, takes w_before - lr*g with g taken at the pruned point."""
    model, params = _neuron(W0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = simulated_step(
        _closure(model, X, T), opt, params, _masks(PRUNED), recovery="feedback", clip_params=list(model.parameters())
    )
    assert loss.item() == LOSS
    # Masked entry: -0.1 - 0.25*(-3.0) = 0.65 (starting from 0 would give 0.75; g[1] at the dense point would
    # be -1.7*2).
    _assert_weights(model, [W0[0] - LR * G[0], W0[1] - LR * G[1], W0[2] - LR * G[2]])


def test_hard_step_leaves_pruned_weights_exactly_zero():
    """hard: the forward uses the model as it is (pruned weight already 0); pruned weights are 0 after."""
    model, params = _neuron([W0[0], 0.0, W0[2]])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = hard_step(_closure(model, X, T), opt, params, _masks(PRUNED), clip_params=list(model.parameters()))
    assert loss.item() == LOSS
    _assert_weights(model, [W0[0] - LR * G[0], 0.0, W0[2] - LR * G[2]])
    assert model.weight.detach()[0, 1].item() == 0.0


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adamw-wd", "sgd-momentum-wd"],
)
def test_frozen_undoes_optimizer_state_on_masked_weights(make_opt):
    """frozen: weight decay, momentum and Adam moments never move a pruned weight, step after step."""
    model, params = _neuron(W0)
    opt = make_opt(list(model.parameters()))
    # A dense step first, so the optimiser holds nonzero momentum / moments for the masked entry too.
    opt.zero_grad()
    _closure(model, X, T)().backward()
    opt.step()
    masked_value = model.weight.detach()[0, 1].clone()
    masks = _masks(PRUNED)
    for _ in range(3):
        unpruned_before = model.weight.detach()[0, [0, 2]].clone()
        simulated_step(
            _closure(model, X, T), opt, params, masks, recovery="frozen", clip_params=list(model.parameters())
        )
        assert torch.equal(model.weight.detach()[0, 1], masked_value)
        assert not torch.equal(model.weight.detach()[0, [0, 2]], unpruned_before)  # the step did run


# Recovery at the next ranking: w = [1.0, 0.1, -0.2, 0.5, 0.6, 3.0], x = [1, 1, -1, 0, 0, 0], t = 4,
# lr = 0.25, sparsity 2/6 prunes indices 1 and 2 (|0.1|, |-0.2| are the two smallest).
# At the pruned point y = w0, r = w0 - 4, g = r * x = [r, r, -r, 0, 0, 0]: the same for both variants
# (the forward never sees the masked weights). Four steps, w0 -> w0 - lr*r each:
#   r = -3 -> w0 = 1.75; r = -2.25 -> 2.3125; r = -1.6875 -> 2.734375; r = -1.265625 -> 3.05078125.
R_SEQ = [1.0 - 4, 1.75 - 4, 2.3125 - 4, 2.734375 - 4]
W_REC = [1.0, 0.1, -0.2, 0.5, 0.6, 3.0]
X_REC = [1.0, 1.0, -1.0, 0.0, 0.0, 0.0]


def _four_steps(recovery):
    model, params = _neuron(W_REC)
    first = magnitude_masks(params, 2 / 6)
    assert first["weight"].tolist() == [[False, True, True, False, False, False]]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(4):
        simulated_step(
            _closure(model, X_REC, 4.0), opt, params, first, recovery=recovery, clip_params=list(model.parameters())
        )
    return model, params, first


def test_feedback_lets_pruned_weights_win_their_place_back():
    """feedback: pruned weights pushed along -gradient outgrow unpruned ones; the next ranking recovers them."""
    model, params, first = _four_steps("feedback")
    shift = -LR * sum(R_SEQ)  # 0.25 * (3 + 2.25 + 1.6875 + 1.265625) = 2.05078125
    # w1: 0.1 + 2.05078125 = 2.15078125; w2: -0.2 - 2.05078125 = -2.25078125; w3, w4 get no gradient.
    _assert_weights(model, [1.0 + shift, 0.1 + shift, -0.2 - shift, 0.5, 0.6, 3.0])
    second = magnitude_masks(params, 2 / 6)
    # Smallest two magnitudes are now 0.5 and 0.6 (indices 3, 4): both former pruned weights came back.
    assert second["weight"].tolist() == [[False, False, False, True, True, False]]
    assert recovered(first, second) == 2


def test_frozen_recovers_nothing_on_the_same_data():
    """frozen: the pruned weights stay at 0.1 / -0.2 while every unpruned one stays >= 0.5, so the
    same ranking comes back and nothing is recovered."""
    model, params, first = _four_steps("frozen")
    shift = -LR * sum(R_SEQ)
    # Only w0 moves (1.0 -> 3.05078125, always growing); w3, w4, w5 have zero gradient.
    _assert_weights(model, [1.0 + shift, 0.1, -0.2, 0.5, 0.6, 3.0])
    second = magnitude_masks(params, 2 / 6)
    assert torch.equal(second["weight"], first["weight"])
    assert recovered(first, second) == 0


def test_invalid_recovery_name_is_rejected():
    """A misspelt recovery mode fails loudly, naming the valid ones."""
    model, params = _neuron(W0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="frozen") as info:
        simulated_step(
            _closure(model, X, T), opt, params, _masks(PRUNED), recovery="freeze", clip_params=list(model.parameters())
        )
    assert "feedback" in str(info.value) and "'freeze'" in str(info.value)
