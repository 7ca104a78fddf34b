import math

import torch

from dg2pf_core.distillation import kd_loss


def test_kd_loss_equals_hand_computation():
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
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert abs(kd_loss(s, t, y, T, alpha).item() - expected) < 1e-5


def test_kd_loss_extremes():
    s, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert abs(kd_loss(s, s, y, 4.0, 1.0).item()) < 1e-6  # identical logits: no distillation loss
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, torch.randn(4, 5), y, 4.0, 0.0), ce)
