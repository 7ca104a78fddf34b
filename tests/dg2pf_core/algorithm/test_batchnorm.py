"""BatchNorm recalibration: statistics of the network as pruned now, weights untouched."""

import torch
from tiny import TinyNet

from dg2pf_core.algorithm.batchnorm import has_batchnorm, recalibrate_batchnorm


def test_recalibration_gives_the_exact_average_of_the_batches_statistics():
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.conv.weight[:, :, 1] = 0.0  # a "mask change": the old statistics are stale now
    batches = [(torch.randn(16, 1, 8, 8) + i, torch.zeros(16, dtype=torch.long)) for i in range(3)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    used = recalibrate_batchnorm(model, iter(batches), torch.device("cpu"), limit=2)
    assert used == 2
    with torch.no_grad():
        feats = [model.conv(x) for x, _ in batches[:2]]
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    expected_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(model.bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(model.bn.running_var, expected_var, atol=1e-4)
    # nothing else changed: weights, momentum, train/eval mode
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert model.bn.momentum == 0.1 and not model.training


def test_a_model_without_batchnorm_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    assert not has_batchnorm(model)
    assert recalibrate_batchnorm(model, [(torch.randn(2, 1, 8, 8), None)], torch.device("cpu"), limit=5) == 0


class _ConstantChannelNet(torch.nn.Module):
    """What pruning makes of a network at 1x1 spatial size, in three layers. ``a`` normalises a 2x2 map
    whose pixel (1, 0) is 0 in every image (a border the remaining weights read); ``pick`` keeps only that
    pixel (a pruned stride-2 kernel), so its output is the same for every image of a batch but moves from
    batch to batch with ``a``'s batch statistics; ``b`` normalises it (train mode: exactly its bias). The
    classifier reads ``b``'s channel and the informative pixel (0, 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.BatchNorm2d(1)
        self.pick = torch.nn.Conv2d(1, 1, 2, stride=2, bias=False)
        self.b = torch.nn.BatchNorm2d(1)
        self.fc = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.pick.weight.copy_(torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]]]))
            self.b.weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.fc(torch.cat([a[:, :, 0, 0], self.b(self.pick(a)).flatten(1)], dim=1))


def _constant_channel_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pixels around 1 with a spread that changes from batch to batch, pixel (1, 0) always 0; the class:
    whether pixel (0, 0) is above the batch's mean (what ``a`` in train mode tells)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = 1.0 + torch.randn(64, 1, 2, 2, generator=g) * (0.2 + 2.8 * torch.rand(1, generator=g))
        x[:, :, 1, 0] = 0.0
        out.append((x, (x[:, 0, 0, 0] < x.mean()).long()))
    return out


def _top1(model, batches) -> float:
    with torch.no_grad():
        return 100.0 * sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)


def test_a_channel_constant_within_every_batch_no_longer_kills_the_eval_mode_network():
    """Train mode maps the constant channel to its bias, so the network is right with batch statistics;
    eval mode adds gamma (x - mean) / sqrt(eps) for it, the batch-to-batch offset amplified 316-fold, and
    predicts one class. Settled (gamma 0), eval mode agrees with train mode, and train mode is unchanged."""
    from dg2pf_core.algorithm.batchnorm import (
        constant_channels,
        settle_constant_channels,
        settled,
        settled_channels,
        unsettle,
    )

    train, val = _constant_channel_batches(32, 0), _constant_channel_batches(8, 1)
    model = _ConstantChannelNet()
    model.train()
    assert _top1(model, val) >= 98.0  # batch statistics: the informative pixel decides
    before_train_mode = [model(x).detach() for x, _ in val]
    recalibrate_batchnorm(model, iter(train), torch.device("cpu"), limit=32)
    model.eval()
    with torch.no_grad():  # the eval-mode network is dead: one class for every image
        assert len({int(c) for x, _ in val for c in model(x).argmax(1)}) == 1
    assert list(constant_channels(model)) == [model.b]  # ``a`` varies within a batch: estimated as before
    with settled(model) as count:
        assert count == 1 and settled_channels(model) == 1 and model.b.weight.item() == 0.0
        assert _top1(model, val) >= 98.0
        with torch.no_grad():  # eval-mode predictions are train mode's (up to ``a``'s batch-statistics noise)
            agree = 0
            for x, _ in val:
                model.eval()
                e = model(x).argmax(1)
                model.train()
                agree += int((e == model(x).argmax(1)).sum())
        assert agree >= 0.95 * sum(len(y) for _, y in val)
        model.train()
        assert all(
            torch.allclose(model(x), t, atol=1e-3) for (x, _), t in zip(val, before_train_mode)
        )  # train mode: unchanged (but float rounding)
    assert model.b.weight.item() == 1.0 and settled_channels(model) == 0  # restored after the block
    done = settle_constant_channels(model)  # what a written result gets
    model.eval()
    assert _top1(model, val) >= 98.0
    unsettle(done)
    assert model.b.weight.item() == 1.0
