"""Hugging Face transformers image-classification directories (``--arch hf --checkpoint DIR``): read offline
from config.json, model.safetensors and preprocessor_config.json as ``save_pretrained`` writes them, pruned,
written back as a directory transformers loads (unstructured, N:M), exported, served as evaluated; and every
directory dg2pf cannot or must not load refused before any work, saying why."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from hf_dirs import TINY, hf_dir

from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.algorithm.channels import ChannelPlan, Structure, apply_structure, read_structure
from dg2pf_core.errors import CheckpointError, UnknownArchitectureError
from dg2pf_core.io.inference import InferenceModel
from dg2pf_core.job import load_checkpoint_model
from dg2pf_core.job.model import checkpoint_num_classes
from dg2pf_core.job.prune import prune_to_dir
from dg2pf_core.models import build_model, get_arch
from dg2pf_core.models.registry import parameter_count


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_model_directory_is_the_architecture_with_its_processors_preprocessing(tmp_path):
    vit = get_arch("hf", hf_dir(tmp_path, "vit"))
    assert (vit.name, vit.input_size, vit.in_channels) == ("hf/vit", 32, 3)
    assert (vit.mean, vit.std, vit.interpolation, vit.crop_pct) == ((0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
    deit = get_arch("hf", hf_dir(tmp_path, "deit"))
    assert (deit.input_size, deit.crop_pct, deit.interpolation) == (32, 0.8, "bicubic")  # 32 of 40: the centre
    convnext = get_arch("hf", hf_dir(tmp_path, "convnext"))
    assert (convnext.input_size, convnext.crop_pct) == (32, 0.875)
    written = json.loads((tmp_path / "convnext" / "preprocessor_config.json").read_text())
    assert convnext.mean == tuple(written["image_mean"]) and convnext.std == tuple(written["image_std"])
    bare = get_arch("hf", hf_dir(tmp_path / "bare", "vit", processor=False))  # no processor: the config's size
    assert (bare.input_size, bare.mean, bare.crop_pct) == (32, None, None)
    # A job's output (model.safetensors beside config.json) resolves as its input directory did.
    assert get_arch("hf", tmp_path / "vit" / "model.safetensors").name == "hf/vit"
    model = build_model("hf", 7, tmp_path / "vit")
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)  # a logits tensor, not an output object
    # counted on the meta device (what a service checks against DG2PF_MAX_MODEL_PARAMS before building)
    assert parameter_count("hf", 7, tmp_path / "vit") == sum(p.numel() for p in model.parameters())
    with pytest.raises(UnknownArchitectureError, match="read from a Hugging Face model directory"):
        get_arch("hf")


def test_half_precision_weights_are_trained_in_float32_and_written_back_in_their_dtype(tmp_path):
    d = hf_dir(tmp_path, "vit")
    model = transformers.AutoModelForImageClassification.from_pretrained(str(d), local_files_only=True)
    model.to(torch.float16).save_pretrained(d)  # config.json now says dtype float16
    spec, loaded, dtypes = load_checkpoint_model("hf", 10, d)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # trained in float32
    assert set(dtypes.values()) == {torch.float16}  # recorded: the output is written in the input's dtype


def test_its_weights_are_read_by_transformers_and_fit_exactly(tmp_path):
    d = hf_dir(tmp_path, "vit")
    assert checkpoint_num_classes("hf", d) == 10
    spec, model, dtypes = load_checkpoint_model("hf", 10, d)
    reference = transformers.AutoModelForImageClassification.from_pretrained(str(d), local_files_only=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(pixel_values=x).logits)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint_model("hf", 10, hf_dir(tmp_path / "other", "vit", num_labels=5))
    with pytest.raises(CheckpointError, match="--arch hf"):  # a directory under another architecture's name
        load_checkpoint_model("torchvision/resnet18", 10, d)
    # its model.safetensors named instead of the directory: read the same way (transformers' key layout)
    _, same, _ = load_checkpoint_model("hf", 10, d / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), reference(pixel_values=x).logits)


@pytest.mark.parametrize(
    "breakage,match",
    [
        ("weights_file_alone", "holds no config.json"),
        ("no_config", "holds no config.json"),
        ("remote_code", "never runs a model's remote code"),
        ("text_model", "model_type 'bert' has no image classifier"),
        ("backbone_only", "is a ViTModel, not an image classifier"),
        ("pickled", r"pickled \(pytorch_model.bin\), which dg2pf never opens"),
        ("sharded", "sharded checkpoint"),
        ("not_json", "is not readable JSON"),
        ("non_square", "square inputs only"),
        ("unscaled", "unscaled pixel values"),
        ("keys", "does not fit"),
        ("label_bomb", "num_labels must be an integer"),  # transformers would name 10^9 labels
        ("id2label_type", "id2label must be an object"),
        ("timm_wrapper", "timm model wrapped by transformers"),  # timm's own arguments can load any file
        ("deep", "asks for 20000 blocks"),  # a few bytes of config, hours of building
        ("quantized", "the model is quantized"),
        ("resample_list", "resample"),
        ("nested", "nests too deeply"),
    ],
)
def test_a_directory_dg2pf_cannot_or_must_not_load_is_refused_saying_why(tmp_path, breakage, match):
    d = hf_dir(tmp_path, "vit")
    if breakage == "weights_file_alone":
        d = d / "model.safetensors"
        (tmp_path / "vit" / "config.json").unlink()
    elif breakage == "no_config":
        (d / "config.json").unlink()
    elif breakage == "remote_code":
        _edit(d / "config.json", auto_map={"AutoModelForImageClassification": "evil.Model"})
    elif breakage == "text_model":
        _edit(d / "config.json", model_type="bert", architectures=["BertForSequenceClassification"])
    elif breakage == "backbone_only":
        _edit(d / "config.json", architectures=["ViTModel"])
    elif breakage in ("pickled", "sharded"):
        state = safetensors.torch.load_file(str(d / "model.safetensors"))
        (d / "model.safetensors").unlink()
        if breakage == "pickled":
            torch.save(state, d / "pytorch_model.bin")
        else:
            (d / "model.safetensors.index.json").write_text("{}")
    elif breakage == "not_json":
        (d / "config.json").write_text("{not json")
    elif breakage == "non_square":
        _edit(d / "preprocessor_config.json", size={"height": 32, "width": 48})
    elif breakage == "id2label_type":
        _edit(d / "config.json", id2label=5)
    elif breakage == "timm_wrapper":
        _edit(
            d / "config.json", model_type="timm_wrapper", architecture="resnet18", model_args={"checkpoint_path": "/x"}
        )
    elif breakage == "deep":
        _edit(d / "config.json", num_hidden_layers=20000)
    elif breakage == "quantized":
        _edit(d / "config.json", quantization_config={"quant_method": "bitsandbytes"})
    elif breakage == "resample_list":
        _edit(d / "preprocessor_config.json", resample=[1])
    elif breakage == "nested":
        (d / "preprocessor_config.json").write_text("[" * 100_000 + "]" * 100_000)
    elif breakage == "label_bomb":
        _edit(d / "config.json", num_labels=10**9)
    elif breakage == "unscaled":
        _edit(d / "preprocessor_config.json", do_rescale=False)
    else:
        state = safetensors.torch.load_file(str(d / "model.safetensors"))
        state["vit.extra.weight"] = torch.zeros(3)
        state.pop(next(k for k in state if k.endswith("fc1.weight") or k.endswith("intermediate.dense.weight")))
        safetensors.torch.save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((CheckpointError, UnknownArchitectureError), match=match):
        load_checkpoint_model("hf", 10, d)


@pytest.mark.parametrize("kind", list(TINY))
def test_channel_removal_on_each_verified_transformers_family_equals_its_masks(tmp_path, kind):
    d = hf_dir(tmp_path, kind)
    spec = get_arch("hf", d)
    model = build_model("hf", 10, d).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand(p.shape, generator=g) * 2)  # an untrained init ranks channels almost uniformly
    shape = (3, 32, 32)
    plan = ChannelPlan.build(model, shape)
    params = dict(model.named_parameters())
    fraction, ratio = plan.fraction_for_macs(params, 0.7, lambda t: 1 - 0.6 * (1 - t))
    selected = plan.select(params, fraction, 1 - 0.6 * (1 - fraction))
    x = torch.randn(3, *shape)
    with torch.no_grad():
        for name, mask in plan.masks(params, selected).items():
            params[name].masked_fill_(mask, 0.0)
        masked = model(x)
        stage = plan.pruned_channels(selected)
        apply_structure(model, Structure(shape).then(stage), spec.name)
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-5)
    assert ratio == pytest.approx(0.7, rel=0.05)
    if kind in ("vit", "deit"):  # attention is pruned by whole heads, the MLP by hidden units
        heads = [k for k in stage if k.endswith("#heads")]
        assert heads and any(not k.endswith("#heads") for k in stage)
        for key in heads:
            attention = model.get_submodule(key.removesuffix("#heads"))
            left = TINY[kind]().num_attention_heads - len(stage[key])
            assert attention.num_attention_heads == left
            assert attention.q_proj.out_features == attention.o_proj.in_features == left * attention.head_dim


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        dict(sparsity=0.7),
        dict(granularity="2:4", sparsity=0.5, exclude=[r"patch_embeddings"]),
        dict(granularity="channel", target_macs_ratio=0.6),
        dict(granularity="channel", sparsity=0.5, include=[r"\.attention\."]),  # whole heads only
    ],
    ids=["unstructured", "2:4", "channel", "heads"],
)
def test_a_model_directory_is_pruned_written_back_exported_and_served_as_evaluated(tmp_path, config):
    d = hf_dir(tmp_path, "vit")
    job = PruneJob("hf", 10, str(d), "digits", DG2PFConfig(max_epochs=1, pruning_epochs=1, batch_size=64, **config))
    out = tmp_path / "out"
    m = prune_to_dir(job, out)
    assert m.arch == "hf" and m.onnx is not None and m.onnx.written  # exported, checked against PyTorch
    assert (m.mean, m.std, m.interpolation, m.image_size) == ([0.5] * 3, [0.5] * 3, "bilinear", 32)
    assert (out / "config.json").read_bytes() == (d / "config.json").read_bytes()
    assert (out / "preprocessor_config.json").is_file()
    served = InferenceModel.load(out)
    _, pruned, _ = load_checkpoint_model("hf", 10, str(out / "model.safetensors"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = pruned.eval()(x)
        torch.testing.assert_close(served.model(x), logits, rtol=1e-5, atol=1e-5)
    if "include" in config:  # half of the 2 x 4 heads removed, and nothing else
        (stage,) = read_structure(out / "model.safetensors").stages
        assert all(k.endswith("#heads") for k in stage) and sum(map(len, stage.values())) == 4
        assert sum(a.num_attention_heads for a in pruned.modules() if hasattr(a, "o_proj")) == 4
    elif config.get("granularity") == "channel":
        assert m.macs_sparse / m.macs_dense == pytest.approx(0.6, rel=0.05)
    if config.get("granularity") == "channel":
        with pytest.raises((RuntimeError, OSError, ValueError)):  # narrower than its config: dg2pf's to rebuild
            transformers.AutoModelForImageClassification.from_pretrained(str(out), local_files_only=True)
    else:  # the output is a model directory of the same kind: transformers loads it, to the same logits
        back = transformers.AutoModelForImageClassification.from_pretrained(str(out), local_files_only=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(pixel_values=x).logits, logits, rtol=1e-5, atol=1e-5)
        # and it is an input again: a second job may start from it
        assert load_checkpoint_model("hf", 10, out)[0].name == "hf/vit"


def test_the_command_line_refuses_a_bad_directory_with_exit_2_before_any_work(tmp_path):
    d = hf_dir(tmp_path, "vit")
    _edit(d / "config.json", auto_map={"AutoModelForImageClassification": "evil.Model"})
    run = subprocess.run(
        [sys.executable, "-m", "dg2pf_cli", "prune", "--arch", "hf", "--checkpoint", str(d)]
        + ["--dataset", "digits", "--sparsity", "0.5", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "remote code" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()
    shutil.rmtree(d)
