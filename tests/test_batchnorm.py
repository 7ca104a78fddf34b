"""BatchNorm recalibration: statistics of the network as pruned now, weights untouched."""

import torch

from dg2pf_core.batchnorm import has_batchnorm, recalibrate_batchnorm

from tiny import TinyNet


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
