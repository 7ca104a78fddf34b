"""Every registered architecture is counted and checked at submit without allocating its weights."""

from __future__ import annotations

import pytest

from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.job import check_static, checkpoint_num_classes
from dg2pf_core.models import build_model, list_archs
from dg2pf_core.models.registry import build_meta, parameter_count

# Cheap to build for real, and regnet's builders read the values of tensors they compute.
SMALL = [
    "digits_cnn",
    "cifar/resnet18",
    "torchvision/regnet_y_400mf",
    "torchvision/regnet_x_400mf",
    "torchvision/mobilenet_v3_small",
    "torchvision/squeezenet1_1",
]


@pytest.mark.parametrize("name", [n for n in list_archs() if n != "hf"])  # hf: tests/dg2pf_core/models/test_hf.py
def test_every_architecture_is_counted_without_its_weights(name):
    count = parameter_count(name, 10)
    assert isinstance(count, int) and count > 0


@pytest.mark.parametrize("name", SMALL)
def test_the_count_is_the_real_one(name):
    real = build_model(name, 10)
    assert parameter_count(name, 10) == sum(p.numel() for p in real.parameters())
    meta = build_meta(name, 10)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


def test_a_builder_that_reads_its_tensors_allocates_nothing_big():
    model = build_meta("torchvision/regnet_y_128gf", 10)  # 637M parameters, 2.5 GB in float32
    real = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    assert real < 1_000_000 and parameter_count("torchvision/regnet_y_128gf", 10) > 600_000_000


@pytest.mark.slow
def test_submit_checks_of_a_regnet_run_on_meta(tmp_path):
    ckpt = tmp_path / "regnet.safetensors"
    save_state_dict(build_model("torchvision/regnet_y_400mf", 10).state_dict(), ckpt)
    job = PruneJob(
        arch="torchvision/regnet_y_400mf",
        num_classes=10,
        checkpoint=str(ckpt),
        dataset="digits",
        config=DG2PFConfig(sparsity=0.5),
    )
    _, model, _, _ = check_static(job, meta=True, max_params=10_000_000)
    assert any(p.is_meta for p in model.parameters())
    assert checkpoint_num_classes("torchvision/regnet_y_400mf", ckpt) == 10
