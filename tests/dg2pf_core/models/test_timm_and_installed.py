"""The models users have: timm architectures by name (their own preprocessing, their checkpoints' layout),
and a team's own architectures registered by an installed package (the ``dg2pf.archs`` entry points)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import PIL.Image
import pytest
import safetensors.torch
import timm  # noqa: E402 - a dev dependency (scripts/test.sh installs it): these tests always run in CI
import torch
from torchvision import transforms as T

from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.algorithm.channels import read_structure, unsupported_reason
from dg2pf_core.data.request import DataRequest
from dg2pf_core.data.transforms import FitAndCrop, imagenet_transforms
from dg2pf_core.errors import CheckpointError, DatasetError, UnknownArchitectureError
from dg2pf_core.io.inference import InferenceModel
from dg2pf_core.job import load_checkpoint_model
from dg2pf_core.job.data import load_data
from dg2pf_core.job.prune import prune_to_dir
from dg2pf_core.models import build_model, get_arch, list_archs
from dg2pf_core.models.registry import build_meta, installed_archs


def _save(model: torch.nn.Module, path) -> str:
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_a_timm_name_builds_offline_with_its_pretrained_cfg_as_preprocessing():
    vit = get_arch("timm/vit_tiny_patch16_224")
    assert (vit.input_size, vit.in_channels) == (224, 3)
    assert vit.mean == (0.5, 0.5, 0.5) and vit.std == (0.5, 0.5, 0.5)
    assert vit.interpolation == "bicubic" and vit.crop_pct == pytest.approx(0.9)
    assert get_arch("timm/volo_d4_448.sail_in1k").crop_pct == 1.0  # its 1.15 capped at the whole image
    tagged = get_arch("timm/resnet50.a1_in1k")  # a tag's own cfg: crop 0.95
    assert tagged.crop_pct == pytest.approx(0.95) and tagged.mean == (0.485, 0.456, 0.406)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # never a hub download
    m = build_model("timm/test_resnet", 7)
    assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert "timm/test_resnet" not in list_archs() and "timm/test_resnet" in list_archs(timm_models=True)


@pytest.mark.parametrize(
    "name,match",
    [
        ("timm/resnet5", r"unknown timm model 'resnet5'; did you mean: timm/resnet50"),
        ("timm/resnet50.no_such_tag", "timm model 'resnet50' has no pretrained tag 'no_such_tag'"),
        ("timm/", "unknown timm model ''"),
        ("timm/../../etc/passwd", "unknown timm model"),
    ],
)
def test_a_bad_timm_name_is_refused_naming_the_closest(name, match):
    with pytest.raises(UnknownArchitectureError, match=match):
        get_arch(name)


def test_a_checkpoint_that_does_not_fit_the_named_timm_model_names_its_first_keys(tmp_path):
    path = _save(build_model("timm/resnet18", 10), tmp_path / "r18.safetensors")
    with pytest.raises(
        CheckpointError, match=r"does not fit timm/resnet34 .*missing from the checkpoint \(first: layer1"
    ):
        load_checkpoint_model("timm/resnet34", 10, path)


def test_folder_images_are_preprocessed_as_the_timm_model_wants_in_training_and_serving(tmp_path):
    root = tmp_path / "folder"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(6):
            image = PIL.Image.new("RGB", (300, 200), (40 * i, 100, 200 if c == "a" else 0))
            image.save(root / "train" / c / f"{i}.png")
    spec = get_arch("timm/test_vit")  # mean/std 0.5, bicubic, its own crop
    splits, size = load_data(f"imagefolder:{root}", spec, 2, None, 0.2, 0)
    assert size == 160
    view = splits.val.dataset  # the held-out images, seen through the evaluation transform
    steps = view.transform.transforms
    crop = next(t for t in steps if isinstance(t, FitAndCrop))
    norm = next(t for t in steps if isinstance(t, T.Normalize))
    assert crop.crop_pct == pytest.approx(spec.crop_pct) and crop.crop.transforms[0].interpolation.value == "bicubic"
    assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.5, 0.5, 0.5)
    # serving preprocesses an image exactly as the job evaluated it
    meta = SimpleNamespace(
        arch="timm/test_vit", num_classes=2, image_size=None, in_channels=None, crop_pct=None,
        class_names=["a", "b"], dataset=f"imagefolder:{root}",
    )  # fmt: skip
    served = InferenceModel.for_module(torch.nn.Identity(), meta)
    image = PIL.Image.open(root / "train" / "a" / "3.png")
    evaluated = view.transform(image)
    torch.testing.assert_close(served.transform(image), evaluated, rtol=0, atol=0)
    # a metrics.json whose normalisation would make every input infinite is refused at load, not per request
    for hostile in (dict(std=[1e-320] * 3), dict(mean=[1e308] * 3), dict(interpolation="lanczos")):
        with pytest.raises(DatasetError, match="must be"):
            InferenceModel.for_module(torch.nn.Identity(), SimpleNamespace(**{**vars(meta), **hostile}))


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,config",
    [
        ("timm/test_resnet", dict(sparsity=0.7)),
        ("timm/test_vit", dict(granularity="2:4", sparsity=0.5, exclude=[r"^patch_embed\."])),
        ("timm/resnet18", dict(granularity="channel", target_macs_ratio=0.5)),
        ("timm/test_vit", dict(granularity="channel", target_macs_ratio=0.6)),  # heads and MLP hidden units
        ("timm/test_vit", dict(granularity="channel", sparsity=0.5, include=[r"\.attn\."])),  # whole heads only
    ],
)
def test_a_timm_checkpoint_is_pruned_exported_and_served_as_evaluated(tmp_path, arch, config):
    torch.manual_seed(0)
    checkpoint = _save(build_model(arch, 10), tmp_path / "in.safetensors")
    job = PruneJob(
        arch,
        10,
        checkpoint,
        "digits",
        DG2PFConfig(max_epochs=1, pruning_epochs=1, batch_size=64, **config),
        image_size=32,
    )
    m = prune_to_dir(job, tmp_path / "out")
    assert m.arch == arch and m.onnx is not None and m.onnx.written  # exported, checked against PyTorch
    spec = get_arch(arch)  # its preprocessing kept with the model: serving does not ask the registry again
    assert (m.mean, m.std, m.interpolation) == (list(spec.mean), list(spec.std), spec.interpolation)
    served = InferenceModel.load(tmp_path / "out")
    x = torch.randn(3, 3, 32, 32)
    _, pruned, _ = load_checkpoint_model(arch, 10, str(tmp_path / "out" / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(served.model(x), pruned.eval()(x), rtol=1e-5, atol=1e-5)
    if "target_macs_ratio" in config:
        assert m.macs_sparse / m.macs_dense == pytest.approx(config["target_macs_ratio"], rel=0.05)
    if "include" in config:  # half of the 6 blocks x 2 heads removed, one head left in each block, nothing else
        (stage,) = read_structure(tmp_path / "out" / "model.safetensors").stages
        assert all(k.endswith("#heads") for k in stage) and sum(map(len, stage.values())) == 6
        assert [b.attn.num_heads for b in pruned.blocks] == [1] * 6


def test_channel_granularity_is_allowed_by_name_on_the_verified_timm_families_only():
    for arch in ("timm/vit_tiny_patch16_224", "timm/deit_small_patch16_224", "timm/resnet50.a1_in1k"):
        assert unsupported_reason(arch) is None, arch
    assert unsupported_reason("timm/convnext_atto") is None
    assert "not verified" in unsupported_reason("timm/efficientnet_b0")
    assert "not verified" in unsupported_reason("timm/swin_tiny_patch4_window7_224")


# --- a team's own architecture, from an installed package ----------------------------------------------


def _package(root, name: str, entry_points: dict[str, str], body: str) -> None:
    """A distribution as pip leaves it: the module and its dist-info with entry_points.txt."""
    (root / f"{name}.py").write_text(textwrap.dedent(body))
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[dg2pf.archs]\n{lines}")


BODY = """
    import torch.nn as nn
    from dg2pf_core.models import ArchSpec

    def _build(num_classes):
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, num_classes))

    SPEC = ArchSpec(name="ignored", builder=_build, input_size=8, in_channels=1, description="acme's tiny net")
    GRAY = ArchSpec(name="g", builder=_build, input_size=8, in_channels=1, description="", mean=(0.2,), std=(0.3,))
    NOT_A_SPEC = 42

    def _raises(num_classes):
        raise RuntimeError("builder exploded")

    def _exits(num_classes):
        raise SystemExit(3)

    RAISES = ArchSpec(name="r", builder=_raises, input_size=8, in_channels=1, description="")
    EXITS = ArchSpec(name="e", builder=_exits, input_size=8, in_channels=1, description="")
    NOT_A_MODULE = ArchSpec(name="n", builder=lambda n: {"w": n}, input_size=8, in_channels=1, description="")
    BAD_std = ArchSpec(name="b", builder=_build, input_size=8, in_channels=1, description="", std=(0.0,))
    BAD_mean = ArchSpec(name="b", builder=_build, input_size=8, in_channels=3, description="", mean=(0.5, 0.5))
    BAD_interpolation = ArchSpec(name="b", builder=_build, input_size=8, in_channels=1, description="",
        interpolation="lanczos")
    BAD_input_size = ArchSpec(name="b", builder=_build, input_size="32", in_channels=1, description="")
    BAD_crop_pct = ArchSpec(name="b", builder=_build, input_size=8, in_channels=1, description="", crop_pct=1.5)
"""
SECOND = """
    from acme_nets import SPEC
"""


@pytest.fixture
def installed(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    _package(
        root,
        "acme_nets",
        {
            "acme/tiny": "acme_nets:SPEC",
            "acme/broken": "acme_nets:NOT_A_SPEC",
            "acme/missing": "acme_nets_gone:SPEC",
            "acme/gray": "acme_nets:GRAY",
            "acme/raises": "acme_nets:RAISES",
            "acme/exits": "acme_nets:EXITS",
            "acme/not-a-module": "acme_nets:NOT_A_MODULE",
            "acme/dup": "acme_nets:SPEC",
            **{
                f"acme/bad-{k}": f"acme_nets:BAD_{k}"
                for k in ("std", "mean", "interpolation", "input_size", "crop_pct")
            },
            "torchvision/resnet18": "acme_nets:SPEC",  # shadowing a built-in name: never resolved
            "cifar/acme": "acme_nets:SPEC",  # nor one in a built-in namespace
        },
        BODY,
    )
    _package(root, "other_nets", {"acme/dup": "other_nets:SPEC"}, SECOND)  # a second package, the same name
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return root


def test_an_installed_package_registers_an_architecture_by_entry_point(installed, tmp_path):
    spec = get_arch("acme/tiny")
    assert spec.name == "acme/tiny" and spec.description == "acme's tiny net"
    assert "acme/tiny" in list_archs() and {"acme/broken", "acme/missing", "acme/tiny"} <= set(installed_archs())
    assert not any(n.startswith(("torchvision/", "cifar/")) for n in installed_archs())
    assert get_arch("torchvision/resnet18").description.startswith("torchvision resnet18")  # not shadowed
    with pytest.raises(UnknownArchitectureError, match="unknown architecture 'cifar/acme'"):
        get_arch("cifar/acme")  # channel granularity's cifar/* allowance is not reachable by a package
    with pytest.raises(UnknownArchitectureError, match=r"must name a dg2pf_core.models.ArchSpec, got int"):
        get_arch("acme/broken")
    with pytest.raises(UnknownArchitectureError, match=r"acme_nets_gone:SPEC\), which failed to load"):
        get_arch("acme/missing")
    # a job on it, as on any other architecture
    torch.manual_seed(0)
    checkpoint = _save(build_model("acme/tiny", 10), tmp_path / "acme.safetensors")
    job = PruneJob("acme/tiny", 10, checkpoint, "digits", DG2PFConfig(sparsity=0.5, max_epochs=1, pruning_epochs=1))
    m = prune_to_dir(job, tmp_path / "out")
    assert m.arch == "acme/tiny" and m.sparsity_prunable == pytest.approx(0.5, abs=0.02)


def test_an_installed_architectures_failures_are_refusals_naming_its_package(installed):
    for name, source, match in [
        ("acme/raises", "acme_nets:RAISES", "failed: RuntimeError: builder exploded"),
        ("acme/exits", "acme_nets:EXITS", "failed: SystemExit: 3"),
        ("acme/not-a-module", "acme_nets:NOT_A_MODULE", "returned dict, not a torch.nn.Module"),
    ]:
        for build in (build_model, build_meta):  # the job's build and the service's check at submit
            with pytest.raises(UnknownArchitectureError, match=f"{name}'.*{source}.*{match}"):
                build(name, 10)
    for field, match in [
        ("std", r"std must be 1 or 3 numbers in \[0.0001, 10000\], got \(0.0,\)"),
        ("mean", r"mean must be 3 numbers in \[-10000, 10000\], got \(0.5, 0.5\)"),
        ("interpolation", "interpolation must be one of"),
        ("input_size", "input_size must be an integer in"),
        ("crop_pct", r"crop_pct must be in \[0.25, 1\], got 1.5"),
    ]:
        with pytest.raises(
            UnknownArchitectureError, match=rf"'acme/bad-{field}' \(from acme_nets:BAD_{field}\).*{match}"
        ):
            get_arch(f"acme/bad-{field}")
    with pytest.raises(UnknownArchitectureError, match=r"more than one installed package \(acme_nets:SPEC, other_"):
        get_arch("acme/dup")
    # a single-channel architecture's own normalisation is used as given (not converted from RGB)
    request = DataRequest(image_size=8, in_channels=1, mean=get_arch("acme/gray").mean, std=get_arch("acme/gray").std)
    norm = next(t for t in imagenet_transforms(request)[1].transforms if isinstance(t, T.Normalize))
    assert (tuple(norm.mean), tuple(norm.std)) == ((0.2,), (0.3,))


def test_the_command_line_lists_installed_architectures(installed):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "dg2pf_cli", "archs"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    names = out.stdout.split()
    assert "acme/tiny" in names and "torchvision/resnet50" in names and "digits_cnn" in names
    assert f"timm/<model> for every timm {timm.__version__} model" in out.stderr
