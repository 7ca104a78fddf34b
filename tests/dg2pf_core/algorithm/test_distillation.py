import math

import pytest
import torch

from dg2pf_core import DG2PFConfig
from dg2pf_core.algorithm.distillation import kd_loss


@pytest.mark.parametrize("form", ["standard", "authors"])
def test_kd_loss_equals_hand_computation(form):
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    T, alpha = 4.0, 0.75

    def softmax(row, temp):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(srow, T), softmax(trow, T)
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    kl /= 2
    ce = sum(-math.log(softmax(row, 1.0)[c]) for row, c in zip(s.tolist(), y.tolist())) / 2
    if form == "standard":  # Hinton et al.: only the soft-target term scaled by T^2 (KL:CE 48:1 here)
        expected = alpha * T * T * kl + (1 - alpha) * ce
    else:  # the authors' code: the whole mix scaled by T^2 (3:1)
        expected = (alpha * kl + (1 - alpha) * ce) * T * T
    assert abs(kd_loss(s, t, y, T, alpha, form).item() - expected) < 1e-5
    if form == "standard":
        assert abs(kd_loss(s, t, y, T, alpha).item() - expected) < 1e-5  # the default form


def test_kd_loss_form_is_checked_by_the_config_and_the_function():
    with pytest.raises(ValueError, match="form"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), 4.0, 0.5, "hinton")
    with pytest.raises(Exception, match="kd_loss"):
        DG2PFConfig(sparsity=0.5, kd_loss="hinton")


def test_kd_loss_extremes():
    s, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert abs(kd_loss(s, s, y, 4.0, 1.0).item()) < 1e-6  # identical logits: no distillation loss
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, torch.randn(4, 5), y, 4.0, 0.0), ce)
