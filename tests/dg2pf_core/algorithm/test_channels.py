"""Channel granularity: coupled groups from Torch-Pruning's graph, masks equal to removal, MACs targets,
simulated group pruning that restores bit-exactly, the loop with physical removal, resume, structure files."""

import copy

import pytest
import torch
from tiny import TinyNet

from dg2pf_core import DG2PFConfig, TrainingState, run_dg2pf
from dg2pf_core.algorithm.channels import (
    STRUCTURE_KEY,
    ChannelPlan,
    Structure,
    apply_structure,
    read_structure,
    remove_channels,
)
from dg2pf_core.algorithm.simulated import simulated_step
from dg2pf_core.errors import CheckpointError, ConfigError
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.io.metrics import conv_linear_macs
from dg2pf_core.models import build_model

CPU = torch.device("cpu")
# (arch, input shape): the three, torchvision ones at a small input
ARCHS = [
    ("digits_cnn", (1, 8, 8)),
    ("torchvision/resnet18", (3, 32, 32)),
    ("torchvision/mobilenet_v2", (3, 32, 32)),
    # timm's families on CHANNEL_ARCHS: a ViT's MLP hidden units (its q/k/v kept whole), ResNet, ConvNeXt
    ("timm/vit_tiny_patch16_224", (3, 224, 224)),
    ("timm/resnet18", (3, 32, 32)),
    ("timm/convnext_atto", (3, 32, 32)),
]
CFG = dict(
    granularity="channel",
    sparsity=0.5,
    pruning_epochs=2,
    patience=1,
    max_epochs=5,
    batch_size=16,
    lr=5e-3,
    finetune_lr=1e-2,
    seed=0,
    channel_multiple=1,
)  # TinyNet's layers are narrower than the default 16


def _trained_looking(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Spread the weights' magnitudes (an untrained init ranks channels almost uniformly) and give
    BatchNorm non-trivial statistics, so removal is tested on values that matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand(p.shape, generator=g) * 2)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


@pytest.mark.parametrize("arch,shape", ARCHS)
def test_masked_network_equals_the_removed_one_and_macs_match(arch, shape):
    model = _trained_looking(build_model(arch, 10))
    plan = ChannelPlan.build(model, shape)
    params = dict(model.named_parameters())
    fraction, ratio = plan.fraction_for_macs(params, 0.5, lambda t: 1 - 0.6 * (1 - t))
    selected = plan.select(params, fraction, 1 - 0.6 * (1 - fraction))
    masks = plan.masks(params, selected)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(mask, 0.0)
        masked = model(x)
    structure = Structure(shape).then(plan.pruned_channels(selected))
    apply_structure(model, structure)
    with torch.no_grad():
        removed = model(x)
    torch.testing.assert_close(removed, masked, rtol=1e-4, atol=1e-5)
    dense, _ = conv_linear_macs(build_model(arch, 10), shape, CPU)
    after, _ = conv_linear_macs(model, shape, CPU)
    assert after / dense == pytest.approx(ratio, rel=1e-9)
    assert abs(ratio - 0.5) <= 0.05 * 0.5  # within 5% of the target
    # the structure is data: JSON in, the same shapes out, from the architecture alone
    rebuilt = apply_structure(build_model(arch, 10), Structure.from_json(structure.to_json()))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_groups_couple_residual_sums_and_leave_the_classifier():
    model = build_model("torchvision/resnet18", 10)
    plan = ChannelPlan.build(model, (3, 32, 32))
    roots = {g.root for g in plan.groups}
    assert "fc" not in roots  # the classifier's outputs are the classes
    # one group holds every conv added into layer1's residual stream (conv1, layer1.*.conv2)
    stream = next(g for g in plan.groups if any(i.param == "layer1.0.conv2.weight" for i in g.items))
    params = {i.param for i in stream.items}
    assert {"conv1.weight", "layer1.1.conv2.weight", "bn1.weight", "layer2.0.conv1.weight"} <= params


def test_importance_is_the_root_mean_square_of_a_channel():
    model = TinyNet()
    plan = ChannelPlan.build(model, (1, 8, 8))
    params = dict(model.named_parameters())
    group = next(g for g in plan.groups if g.root == "conv")
    scores = plan.importance(params)["conv"]
    c = 3
    entries = [
        params["conv.weight"][c].flatten(),
        params["conv.bias"][c : c + 1],
        params["bn.weight"][c : c + 1],
        params["bn.bias"][c : c + 1],
        params["fc1.weight"][:, c * 16 : (c + 1) * 16].flatten(),
    ]
    values = torch.cat([e.detach() for e in entries])
    assert group.channels == 8
    assert scores[c].item() == pytest.approx(values.pow(2).mean().sqrt().item(), rel=1e-5)


def test_the_collapse_guard_keeps_channels_in_every_group():
    model = build_model("digits_cnn", 10)
    plan = ChannelPlan.build(model, (1, 8, 8))
    params = dict(model.named_parameters())
    selected = plan.select(params, 0.6, 0.7)
    assert sum(int(v.sum()) for v in selected.values()) == round(0.6 * plan.channels)
    for g in plan.groups:
        assert int(selected[g.root].sum()) <= int(0.7 * g.channels)
    with pytest.raises(ConfigError, match="target_macs_ratio 0.001 cannot be reached"):
        plan.fraction_for_macs(params, 0.001, lambda t: 0.7)


def test_simulated_group_pruning_restores_bit_exactly():
    model = _trained_looking(build_model("torchvision/resnet18", 10)).train()
    plan = ChannelPlan.build(model, (3, 32, 32))
    params = dict(model.named_parameters())
    masks = plan.masks(params, plan.select(params, 0.4, 0.7))
    before = {n: params[n].detach().clone() for n in masks}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    simulated_step(
        lambda: torch.nn.functional.cross_entropy(model(x), y),
        optimizer,
        params,
        masks,
        recovery="frozen",
        clip_params=list(model.parameters()),
    )
    for n, mask in masks.items():
        assert torch.equal(params[n].detach()[mask], before[n][mask]), n  # pruned entries: the same bits
        assert not torch.equal(params[n].detach()[~mask], before[n][~mask]) or not (~mask).any(), n


class Watch:
    def __init__(self, save_dir=None):
        self.save_dir, self.records = save_dir, []

    def __call__(self, record, state):
        self.records.append(record)
        if self.save_dir is not None:
            state.save(self.save_dir / f"epoch{record.epoch}")


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def test_the_loop_removes_channels_after_the_last_pruning_epoch(tiny_loaders):
    w = Watch()
    result = run_dg2pf(_tiny(), tiny_loaders, DG2PFConfig(**CFG), reporter=w, input_shape=(1, 8, 8))
    assert [r.phase for r in w.records[:3]] == ["baseline", "gradual_pruning", "gradual_pruning"]
    assert [r.sparsity for r in w.records[1:3]] == pytest.approx([0.25, 0.5], abs=0.02)
    structure, removed = result.structure, result.channels
    assert removed.channels_pruned == round(0.5 * removed.channels_total)
    # the result is the smaller dense network: conv 8 -> fewer, fc1 32 -> fewer
    assert result.model.conv.out_channels + result.model.fc1.out_features == 40 - removed.channels_pruned
    assert result.masks == {}
    rebuilt = apply_structure(_tiny(), structure)
    rebuilt.load_state_dict(result.model.state_dict())
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(rebuilt.eval()(x), result.model.eval()(x))


def test_target_macs_ratio_is_met(tiny_loaders):
    cfg = DG2PFConfig(**{**CFG, "sparsity": 0.0, "target_macs_ratio": 0.5})
    torch.manual_seed(0)
    result = run_dg2pf(build_model("digits_cnn", 4), tiny_loaders, cfg, input_shape=(1, 8, 8))
    pruned, _ = conv_linear_macs(result.model, (1, 8, 8), CPU)
    assert abs(pruned / result.channels.macs_dense - 0.5) <= 0.05 * 0.5


@pytest.mark.parametrize("stop_after,finetune", [(1, "sgd"), (3, "overparam")])
def test_resume_after_and_before_the_removal(tiny_loaders, tmp_path, stop_after, finetune):
    cfg = DG2PFConfig(**{**CFG, "finetune": finetune, "max_epochs": 6})
    full = Watch(tmp_path)
    result = run_dg2pf(_tiny(), tiny_loaders, cfg, reporter=full, input_shape=(1, 8, 8))
    state = TrainingState.load(tmp_path / f"epoch{stop_after}")
    again = run_dg2pf(_tiny(), tiny_loaders, cfg, resume=state, input_shape=(1, 8, 8))
    a, b = result.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"granularity": "unstructured", "sparsity": 0.0, "target_macs_ratio": 0.5},
            "only applies to granularity 'channel'",
        ),
        ({"sparsity": 0.0, "target_macs_ratio": 1.5}, "strictly between 0 and 1"),
        ({"target_macs_ratio": 0.5}, "give sparsity or target_macs_ratio, not both"),
        ({"sparsity": 0.0}, "or give target_macs_ratio, latency_budget_ms or max_top1_drop with granularity 'channel'"),
        ({"scope": "layerwise"}, "leave scope 'global'"),
    ],
)
def test_bad_channel_options_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        DG2PFConfig(**{**CFG, **change})


def test_structures_from_files_are_checked(tmp_path):
    model = build_model("digits_cnn", 10)
    path = tmp_path / "m.safetensors"
    save_state_dict(model.state_dict(), path)
    assert read_structure(path) is None
    for text, match in [
        ("{", "not JSON"),
        ('{"format":"other"}', "format"),
        ('{"format":"dg2pf-channels/1","input_shape":[1,8,8],"stages":[{"features.0":[-1]}]}', "distinct non-negative"),
        ('{"format":"dg2pf-channels/1","input_shape":[1,8],"stages":[]}', "input_shape"),
    ]:
        save_state_dict(model.state_dict(), path, metadata={STRUCTURE_KEY: text})
        with pytest.raises(CheckpointError, match=match):
            read_structure(path)
    for stage, match in [({"nope": [0]}, "not a Conv/Linear layer"), ({"features.0": [10_000]}, "which has")]:
        with pytest.raises(CheckpointError, match=match):
            remove_channels(copy.deepcopy(model), (1, 8, 8), stage)
    classifier = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    with pytest.raises(CheckpointError, match="removes outputs of the classifier"):
        apply_structure(copy.deepcopy(model), Structure((1, 8, 8), ({classifier: [0, 1]},)))


@pytest.mark.parametrize(
    "text, match",
    [
        (
            '{"format":"dg2pf-channels/1","input_shape":[1,8,8],"stages":' + "[" * 100_000 + "]" * 100_000 + "}",
            "nested too deeply",
        ),
        ('{"format":"dg2pf-channels/1","input_shape":[1,4096,4096],"stages":[]}', "height and width in"),
        ('{"format":"dg2pf-channels/1","input_shape":[64,8,8],"stages":[]}', "channels in"),
    ],
)
def test_a_tampered_structure_is_refused_before_any_tracing(tmp_path, text, match):
    path = tmp_path / "m.safetensors"
    save_state_dict(build_model("digits_cnn", 10).state_dict(), path, metadata={STRUCTURE_KEY: text})
    with pytest.raises(CheckpointError, match=match):
        read_structure(path)


@pytest.mark.parametrize(
    "structure, match",
    [
        (Structure((3, 8, 8), ({"features.0": [0]},)), "traced on 3-channel inputs, but this DigitsCNN takes 1"),
        (Structure((1, 2, 2), ({"features.0": [0]},)), "cannot be replayed"),  # too small for its pooling
        (Structure((1, 8, 8), ({"features.0": list(range(32))},)), "removes all 32 channels of 'features.0'"),
        (Structure((1, 8, 8), ({"features.0": [63]},)), "prunes channel 63 of 'features.0', which has 32"),
    ],
)
def test_a_structure_that_does_not_fit_the_architecture_is_a_checkpoint_error(structure, match):
    with pytest.raises(CheckpointError, match=match):
        apply_structure(build_model("digits_cnn", 10), structure)


def test_every_stage_is_checked_by_name_before_the_first_is_traced():
    model = build_model("digits_cnn", 10)
    with pytest.raises(CheckpointError, match="'nope', which is not a Conv/Linear layer"):
        apply_structure(model, Structure((1, 8, 8), ({"features.0": [0]}, {"nope": [0]})))
    assert model.features[0].out_channels == 32  # nothing was removed (nor traced) for a structure that cannot fit


def test_a_model_the_tracer_cannot_take_is_a_config_error_naming_granularity():
    # Torch-Pruning 1.6 cannot trace ShuffleNetV2's channel shuffle (ZeroDivisionError inside it);
    # a ViT cannot run on 32x32 inputs at all. Neither may surface as a bare exception.
    for arch in ("torchvision/shufflenet_v2_x0_5", "torchvision/vit_b_32"):
        with torch.device("meta"):
            model = build_model(arch, 10)
        with pytest.raises(ConfigError, match="granularity 'channel' cannot trace") as info:
            ChannelPlan.build(model, (3, 32, 32))
        assert info.value.field == "granularity" and "\n" not in info.value.message
    with pytest.raises(ConfigError, match="at most 512x512"):
        ChannelPlan.build(build_model("digits_cnn", 10), (1, 1024, 1024))


@pytest.mark.parametrize("mlp", ["GluMlp", "SwiGLUPacked"])
def test_a_packed_gated_mlp_is_left_dense_and_said_not_an_index_error(mlp):
    # timm's packed gated MLPs (fc1 gives 2 x hidden, split in two) trace as fc1 coupled 1:1 to fc2's input,
    # which has half the channels: such a group is skipped with the reason, never pruned out of bounds.
    import timm.layers
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    layer = getattr(timm.layers, mlp)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_layer=layer)
    vit.eval()
    plan = ChannelPlan.build(vit, (3, 32, 32))  # its attention heads are still pruned, whole
    assert {g.root for g in plan.groups} == {"blocks.0.attn#heads", "blocks.1.attn#heads"}
    packed = "has 64 channels and the traced group maps more onto it (a packed or split layer)"
    assert any(packed in s for s in plan.skipped)


def test_architectures_channel_granularity_cannot_take_are_refused_by_name_before_any_tracing(tmp_path):
    from dg2pf_core.algorithm.channels import check_architecture, unsupported_reason
    from dg2pf_core.job import load_checkpoint_model
    from dg2pf_core.models import list_archs

    verdicts = {arch: unsupported_reason(arch) for arch in list_archs()}  # names only: instant for every one
    for arch in ("digits_cnn", "cifar/resnet18", "torchvision/resnet50", "torchvision/mobilenet_v2"):
        assert verdicts[arch] is None
    for arch, needle in [
        ("torchvision/swin_t", "memory"),
        ("torchvision/maxvit_t", "memory"),
        ("torchvision/shufflenet_v2_x1_0", "channel shuffle"),
        ("no/such_arch", "not verified"),
    ]:
        with pytest.raises(ConfigError, match=needle) as info:
            check_architecture(arch)
        assert info.value.field == "granularity" and "unstructured" in info.value.message
    # A checkpoint whose metadata claims a channel structure for such an architecture is refused
    # before its structure is traced (swin_t's graph alone would take minutes and GBs).
    path = tmp_path / "swin.safetensors"
    save_state_dict(
        {"w": torch.zeros(1)},
        path,
        metadata={STRUCTURE_KEY: Structure((3, 224, 224), ({"features.0.0": [0]},)).to_json()},
    )
    with pytest.raises(CheckpointError, match="never writes for torchvision/swin_t"):
        load_checkpoint_model("torchvision/swin_t", 10, path)


@pytest.mark.parametrize("arch,shape", ARCHS[1:])
def test_kept_widths_are_multiples_of_channel_multiple_and_the_macs_target_still_holds(arch, shape):
    model = _trained_looking(build_model(arch, 10))
    plan = ChannelPlan.build(model, shape)
    params = dict(model.named_parameters())
    cap = DG2PFConfig(granularity="channel", target_macs_ratio=0.5).layer_cap
    fraction, ratio = plan.fraction_for_macs(params, 0.5, cap, multiple=16)
    selected = plan.select(params, fraction, cap(fraction), multiple=16)
    for g in plan.groups:  # widths in units: a head is head_dim units (64 on vit_tiny, a multiple of 16 itself)
        kept = g.channels - int(selected[g.root].sum())
        assert kept == g.channels or (kept * g.unit) % 16 == 0, (g.root, g.channels, kept)
    assert sum(int(v.sum()) for v in selected.values()) > 0 and abs(ratio - 0.5) <= 0.05 * 0.5
    # what is put back is the most important of a group's pruned channels: the kept set is still a top set
    importance = plan.importance(params)
    for g in plan.groups:
        pruned, kept = importance[g.root][selected[g.root]], importance[g.root][~selected[g.root]]
        assert not len(pruned) or pruned.max() <= kept.min()
    apply_structure(model, Structure(shape).then(plan.pruned_channels(selected)))
    after, _ = conv_linear_macs(model, shape, CPU)
    dense, _ = conv_linear_macs(build_model(arch, 10), shape, CPU)
    assert after / dense == pytest.approx(ratio, rel=1e-9)


def test_a_macs_target_that_rounding_makes_unreachable_names_channel_multiple():
    plan = ChannelPlan.build(build_model("digits_cnn", 10), (1, 8, 8))
    params = dict(build_model("digits_cnn", 10).named_parameters())
    with pytest.raises(ConfigError, match="channel_multiple") as info:
        plan.check_reachable(params, 0.2, lambda t: 0.99, multiple=64)
    assert info.value.field == "target_macs_ratio"


def test_a_narrow_network_falls_back_to_a_smaller_multiple_to_meet_the_macs_target():
    # digits_cnn (32/64/128 channels) in steps of 16 lands at 0.44x for a 0.5 target: fit_macs halves the
    # multiple until the target holds within MACS_TOLERANCE; resnet18's widths keep 16.
    from dg2pf_core.algorithm.channels import MACS_TOLERANCE

    for arch, shape, expect in [
        ("digits_cnn", (1, 8, 8), lambda m: m < 16),
        ("torchvision/resnet18", (3, 32, 32), lambda m: m == 16),
    ]:
        model = _trained_looking(build_model(arch, 10))
        plan = ChannelPlan.build(model, shape)
        params = dict(model.named_parameters())
        cap = DG2PFConfig(granularity="channel", target_macs_ratio=0.5).layer_cap
        fraction, ratio, multiple = plan.fit_macs(params, 0.5, cap, 16)
        assert expect(multiple) and abs(ratio - 0.5) <= MACS_TOLERANCE * 0.5, (arch, multiple, ratio)
        selected = plan.select(params, fraction, cap(fraction), multiple)
        assert all(
            (g.channels - int(selected[g.root].sum())) % multiple == 0 or not selected[g.root].any()
            for g in plan.groups
        )


def test_a_channel_fraction_beyond_the_collapse_guard_is_refused():
    plan = ChannelPlan.build(build_model("digits_cnn", 10), (1, 8, 8))
    plan.check_fraction(0.5, 0.9)
    with pytest.raises(ConfigError, match="layer collapse guard") as info:
        plan.check_fraction(0.99, 0.9)
    assert info.value.field == "sparsity"


# ------------------------------------------------------------------------------ jobs and artifacts


def _image_folder(root, size: int = 32, per_class: int = 6) -> str:
    """Real PNG files, three classes in train/ and test/ (class-coloured noise: learnable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 96, size=(size, size, 3), dtype=np.uint8)
                pixels[..., c] += 128
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return f"imagefolder:{root}"


# timm jobs are in tests/dg2pf_core/models/test_timm_and_installed.py (a ViT takes no 32 px input)
@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a, _ in ARCHS if not a.startswith("timm/")])
def test_a_channel_job_writes_artifacts_that_reload_to_the_same_logits(tmp_path, arch, monkeypatch, caplog):
    from onnx_runs import onnx_logits

    from dg2pf_contract.artifacts import Artifacts
    from dg2pf_contract.results import Latency
    from dg2pf_core.io.inference import InferenceModel
    from dg2pf_core.io.onnx_export import ATOL
    from dg2pf_core.job import PruneJob, load_checkpoint_model, prepare, result_metrics, run, write_results

    classes = 10 if arch == "digits_cnn" else 3
    dataset = "digits" if arch == "digits_cnn" else _image_folder(tmp_path / "data")
    torch.manual_seed(0)
    ckpt = tmp_path / "in.safetensors"
    save_state_dict(_trained_looking(build_model(arch, classes)).state_dict(), ckpt)
    config = DG2PFConfig(
        granularity="channel", target_macs_ratio=0.5, pruning_epochs=1, max_epochs=2, patience=1, batch_size=32, seed=0
    )
    job = PruneJob(arch, classes, str(ckpt), dataset, config, image_size=None if arch == "digits_cnn" else 32)
    prepared = prepare(job)
    result = run(prepared)
    metrics = result_metrics(prepared, result, world_size=1, wall_seconds=0.0)
    out = tmp_path / "out"
    out.mkdir()
    if arch != "digits_cnn":  # latency of the bigger ones is bench_latency's (a minute each here): artifacts only
        monkeypatch.setattr(
            "dg2pf_core.job.write.job_latency", lambda *a: Latency(backends={"torch": {}, "onnxruntime": {}})
        )
    # Even when its plots cannot be written (a directory in the way): a warning, and nothing else is lost.
    (out / "training.png").mkdir()
    with caplog.at_level("WARNING", logger="dg2pf_core.job.write"):
        metrics = write_results(out, prepared, result, metrics)
    assert "plots (training.png, layers.png) were not drawn: IsADirectoryError" in caplog.text
    assert (out / "metrics.json").is_file() and not (out / "layers.png").exists()

    assert metrics.granularity == "channel" and metrics.channels_pruned > 0
    assert abs(metrics.macs_sparse / metrics.macs_dense - 0.5) <= 0.05 * 0.5
    assert metrics.params_total < metrics.params_dense
    x = torch.randn(4, *prepared.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = result.model.eval()(x)
    _, reloaded, _ = load_checkpoint_model(arch, classes, Artifacts(out).model)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), expected)  # the dense artifact
    served = InferenceModel.load(out)  # the compact artifact, what serving loads
    assert torch.equal(served.logits(x), expected)
    assert metrics.onnx.written is True
    assert (onnx_logits(out / "model.onnx", x) - expected).abs().max() <= ATOL * max(1.0, float(expected.abs().max()))
    # the pruned network really is smaller: measured side by side in the job
    assert set(metrics.latency.backends) == {"torch", "onnxruntime"}


def test_a_pruned_model_pruned_again_replays_both_stages(tmp_path):
    from dg2pf_core.job import load_checkpoint_model

    shape = (1, 8, 8)
    model = _trained_looking(build_model("digits_cnn", 10))
    structure = Structure(shape)
    for fraction in (0.3, 0.3):  # the second stage in the numbering the first one left
        plan = ChannelPlan.build(model, shape)
        params = dict(model.named_parameters())
        stage = plan.pruned_channels(plan.select(params, fraction, 0.7))
        remove_channels(model, shape, stage)
        structure = structure.then(stage)
    path = tmp_path / "twice.safetensors"
    save_state_dict(model.state_dict(), path, metadata={STRUCTURE_KEY: structure.to_json()})
    _, reloaded, _ = load_checkpoint_model("digits_cnn", 10, path)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("finetune", ["sgd", "overparam"])
def test_params_dense_counts_the_input_model_not_its_teacher_nor_a_restored_state(tiny_loaders, tmp_path, finetune):
    """metrics.json's params_dense: the model the run started from, here already channel-pruned, with
    the dense model as its teacher; the same after resuming past the removal."""
    shape = (1, 8, 8)

    def pruned_input() -> TinyNet:
        return apply_structure(_tiny(), Structure(shape, ({"conv": [0, 1], "fc1": [0, 1, 2, 3]},)))

    count = sum(p.numel() for p in pruned_input().parameters())
    assert sum(p.numel() for p in _tiny().parameters()) > count
    cfg = DG2PFConfig(**{**CFG, "finetune": finetune, "max_epochs": 6})
    w = Watch(tmp_path)
    result = run_dg2pf(pruned_input(), tiny_loaders, cfg, teacher=_tiny(), reporter=w, input_shape=shape)
    assert "finetuning" in [r.phase for r in w.records]  # the over-parameterized phase ran, and did not count
    assert result.channels.params_dense == count
    assert 0 < result.channels.params_prunable <= count
    again = run_dg2pf(
        pruned_input(),
        tiny_loaders,
        cfg,
        teacher=_tiny(),
        resume=TrainingState.load(tmp_path / "epoch3"),
        input_shape=shape,
    )
    assert again.channels.params_dense == count


def _tiny_vit(**attn):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    if attn:  # rebuild the first block's attention with other options (a gate, a scale norm)
        from timm.layers import Attention

        vit.blocks[0].attn = Attention(64, num_heads=4, qkv_bias=True, norm_layer=torch.nn.LayerNorm, **attn)
    return _trained_looking(vit)


def test_vit_attention_is_pruned_by_whole_heads_and_the_masked_network_equals_the_removed_one():
    model = _tiny_vit()
    shape = (3, 32, 32)
    plan = ChannelPlan.build(model, shape)
    heads = {g.root: g for g in plan.groups if g.root.endswith("#heads")}
    assert set(heads) == {"blocks.0.attn#heads", "blocks.1.attn#heads"}
    assert all(g.channels == 4 and g.unit == 16 for g in heads.values())
    params = dict(model.named_parameters())
    # a head is one channel of its group: q, k and v rows of the fused qkv, and the proj columns reading it
    masks = plan.masks(params, {g.root: torch.arange(g.channels) == 1 for g in plan.groups})
    rows = masks["blocks.0.attn.qkv.weight"].all(1)
    assert [int(i) for i in torch.nonzero(rows).flatten()] == [
        *range(16, 32),
        *range(64 + 16, 64 + 32),
        *range(128 + 16, 128 + 32),
    ]
    assert torch.nonzero(masks["blocks.0.attn.proj.weight"].all(0)).flatten().tolist() == list(range(16, 32))
    fraction, _ = plan.fraction_for_macs(params, 0.6, lambda t: 0.75, multiple=16)
    selected = plan.select(params, fraction, 0.75, multiple=16)
    stage = plan.pruned_channels(selected)
    assert any(k.endswith("#heads") for k in stage)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        for name, mask in plan.masks(params, selected).items():
            params[name].masked_fill_(mask, 0.0)
        masked = model(x)
        apply_structure(model, Structure(shape).then(stage))
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-5)
    for block in model.blocks:
        left = 4 - len(stage.get(f"blocks.{list(model.blocks).index(block)}.attn#heads", []))
        assert block.attn.num_heads == left and block.attn.attn_dim == 16 * left
        assert block.attn.qkv.out_features == 3 * 16 * left and block.attn.proj.in_features == 16 * left
    # the structure is data: the same shapes rebuilt from the dense architecture
    rebuilt = apply_structure(_tiny_vit(), Structure.from_json(Structure(shape).then(stage).to_json()))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("option,why", [("gated", "gate"), ("scale_norm", "norm (LayerNorm) depends on the heads")])
def test_attention_with_a_per_head_part_of_its_own_keeps_its_heads_and_says_why(option, why):
    model = _tiny_vit(**{option: True})
    plan = ChannelPlan.build(model, (3, 32, 32))
    roots = {g.root for g in plan.groups}
    assert "blocks.0.attn#heads" not in roots and "blocks.1.attn#heads" in roots
    assert any(s.startswith("blocks.0.attn (") and why in s for s in plan.skipped)


@pytest.mark.parametrize(
    "stage,needle",
    [
        ({"blocks.0.attn#heads": [0, 1, 2, 3]}, "has 4"),
        ({"blocks.0.attn#heads": [4]}, "has 4"),
        ({"blocks.0.mlp#heads": [0]}, "not an attention module"),
        ({"#heads": [0]}, "not an attention module"),
    ],
)
def test_a_head_structure_that_does_not_fit_is_refused(stage, needle):
    with pytest.raises(CheckpointError, match=needle):
        apply_structure(_tiny_vit(), Structure((3, 32, 32), (stage,)))


def test_heads_are_rounded_so_the_kept_attention_width_is_a_multiple_of_channel_multiple():
    from timm.models.vision_transformer import VisionTransformer

    for dim, heads, step in ((96, 4, 2), (96, 8, 4), (48, 8, 8), (64, 4, 1)):  # head_dim 24, 12, 6, 16
        vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=dim, depth=1, num_heads=heads, num_classes=10)
        group = next(g for g in ChannelPlan.build(vit, (3, 32, 32)).groups if g.root.endswith("#heads"))
        assert group.multiple(16) == step and (step * group.unit) % 16 == 0


@pytest.mark.parametrize(
    "stage,needle",
    [
        ({"blocks.0.attn.qkv": [5]}, "only ever prunes by whole heads"),  # single q/k/v outputs break the reshape
        ({"blocks.0.attn#heads": [0]}, "norm \\(LayerNorm\\) depends on the heads"),  # a scale norm spans the heads
    ],
)
def test_a_structure_that_cuts_attention_other_than_by_whole_heads_is_refused(stage, needle):
    model = _tiny_vit(scale_norm=True)
    model.blocks[0].attn.norm = torch.nn.LayerNorm(64, elementwise_affine=False)  # parameter-free: still spans
    with pytest.raises(CheckpointError, match=needle):
        apply_structure(model, Structure((3, 32, 32), (stage,)))
