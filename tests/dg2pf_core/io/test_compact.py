"""Compact sparse artifacts: exact round trip, fp16 rounding, refusal of damaged files, real pruned model size."""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch

from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.errors import CheckpointError, ConfigError
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.io.checkpoints import load_into, read_state_dict
from dg2pf_core.io.compact import FORMAT, is_compact, load_compact, save_compact
from dg2pf_core.models import build_model


def pruned_state() -> dict[str, torch.Tensor]:
    """Every kind of entry a pruned state_dict has, with sizes that are not multiples of 8."""
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(13, 7, 3, 3, generator=g)
    conv[torch.rand(conv.shape, generator=g) < 0.9] = 0.0
    conv.view(-1)[:5] = -0.0  # counts as zero
    linear = torch.randn(10, 37, generator=g)
    linear[torch.rand(linear.shape, generator=g) < 0.95] = 0.0
    return {
        "conv.weight": conv,
        "bn.weight": torch.rand(13, generator=g) + 0.5,  # fully dense
        "bn.bias": torch.zeros(13),  # all zero
        "bn.running_mean": torch.randn(13, generator=g),
        "bn.running_var": torch.rand(13, generator=g),
        "bn.num_batches_tracked": torch.tensor(42),  # int64 scalar buffer
        "lin.weight": linear,
        "lin.bias": torch.randn(10, generator=g),
        "big_zero": torch.zeros(1001),
        "empty": torch.empty(0, 5),
        "ids": torch.arange(9, dtype=torch.int32),
        "half.weight": linear.half(),
    }


def header(path) -> tuple[dict, list]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return meta, json.loads(meta["layout"])


def test_fp32_round_trip_is_exact(tmp_path):
    state = pruned_state()
    path = tmp_path / "m.compact.safetensors"
    save_compact(state, path)
    out = load_compact(path)
    assert list(out) == list(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v), k
    assert not torch.signbit(out["conv.weight"].view(-1)[:5]).any()  # -0.0 comes back as +0.0
    meta, layout = header(path)
    assert meta["format"] == FORMAT and meta["version"] == "1" and meta["values"] == "fp32"
    enc = {name: e for name, e, _, _ in layout}
    assert enc["conv.weight"] == enc["lin.weight"] == enc["big_zero"] == enc["half.weight"] == "m"
    assert enc["bn.weight"] == enc["bn.num_batches_tracked"] == enc["empty"] == enc["ids"] == "d"


def test_fp16_values_are_within_half_rounding(tmp_path):
    state = pruned_state()
    path = tmp_path / "m.compact.safetensors"
    save_compact(state, path, values="fp16")
    out = load_compact(path)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        if v.is_floating_point():
            assert torch.equal(out[k], v.half().to(v.dtype)), k
        else:
            assert torch.equal(out[k], v), k
    with safetensors.safe_open(str(path), framework="pt") as f:
        floats = [f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()]
    assert floats and set(floats) == {torch.float16}
    save_compact(state, tmp_path / "fp32")
    assert path.stat().st_size < (tmp_path / "fp32").stat().st_size


def test_bad_value_dtype_and_fp16_overflow_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="compact_values"):
        save_compact(pruned_state(), tmp_path / "x", values="int8")
    with pytest.raises(ConfigError, match="float16 range"):
        save_compact({"w": torch.tensor([1e6, 0.0, 0.0])}, tmp_path / "x", values="fp16")
    special = {"w": torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, 60000.0])}
    save_compact(special, tmp_path / "ok", values="fp16")  # inf and NaN exist in float16
    assert torch.equal(load_compact(tmp_path / "ok")["w"][:2], special["w"][:2])
    with pytest.raises(ConfigError, match="compact_values"):
        PruneJob("digits_cnn", 10, "ckpt", "digits", DG2PFConfig(sparsity=0.9), compact_values="fp8")


def test_prune_job_round_trips_with_compact_values():
    job = PruneJob("digits_cnn", 10, "ckpt", "digits", DG2PFConfig(sparsity=0.9), compact_values="fp16")
    assert PruneJob.from_dict(job.to_dict()) == job
    old = {k: v for k, v in job.to_dict().items() if k != "compact_values"}  # records from before the field
    assert PruneJob.from_dict(old).compact_values == "fp32"


def test_read_state_dict_accepts_compact_and_is_compact_reads_headers(tmp_path):
    state = pruned_state()
    compact, dense, pt = tmp_path / "c.safetensors", tmp_path / "d.safetensors", tmp_path / "d.pt"
    save_compact(state, compact)
    save_state_dict(state, dense)
    torch.save(state, pt)
    assert is_compact(compact) and not is_compact(dense) and not is_compact(pt) and not is_compact(tmp_path / "none")
    out = read_state_dict(compact)
    assert all(torch.equal(out[k], v) for k, v in state.items())


def rewrite(src, dst, *, meta=None, drop=(), replace=None) -> None:
    """A copy of a compact file with its metadata or tensors altered."""
    tensors = safetensors.torch.load_file(str(src))
    with safetensors.safe_open(str(src), framework="pt") as f:
        metadata = {**f.metadata(), **(meta or {})}
    for k in drop:
        del tensors[k]
    tensors.update(replace or {})
    safetensors.torch.save_file(tensors, str(dst), metadata=metadata)


def test_damaged_files_raise_checkpoint_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_compact(pruned_state(), good)
    _, layout = header(good)
    i = next(n for n, e in enumerate(layout) if e[0] == "conv.weight")
    mask = safetensors.torch.load_file(str(good))[f"{i}m"]
    flipped = mask.clone()
    flipped[0] ^= 0xFF  # popcount no longer matches the number of values
    shape_changed = [[n, e, d, [13, 7, 3, 4] if n == "conv.weight" else s] for n, e, d, s in layout]
    cases = {
        "version": ({"meta": {"version": "99"}}, "version '99'"),
        "missing": ({"drop": [f"{i}v"]}, "values of conv.weight"),
        "extra": ({"replace": {"stray": torch.zeros(2)}}, "does not list"),
        "popcount": ({"replace": {f"{i}m": flipped}}, "values are stored"),
        "short_mask": ({"replace": {f"{i}m": mask[:-1].clone()}}, "mask is"),
        "shape": ({"meta": {"layout": json.dumps(shape_changed)}}, "mask is"),
        "layout": ({"meta": {"layout": "[[1,2]]"}}, "malformed layout"),
        "dense_shape": (
            {"replace": {str(next(n for n, e in enumerate(layout) if e[0] == "bn.weight")): torch.ones(12)}},
            "stored shape",
        ),
    }
    for name, (change, needle) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        rewrite(good, bad, **change)
        for reader in (load_compact, read_state_dict):
            with pytest.raises(CheckpointError, match="re-export|upgrade") as info:
                reader(bad)
            assert needle in str(info.value) and str(bad) in str(info.value), (name, str(info.value))
    other = tmp_path / "other.safetensors"
    rewrite(good, other, meta={"format": "pt"})
    assert not is_compact(other)
    with pytest.raises(CheckpointError, match="not a dg2pf compact artifact"):
        load_compact(other)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=str(truncated)):
        read_state_dict(truncated)


@pytest.mark.slow
def test_dg2pf_90_percent_digits_compact_is_at_most_15_percent_and_equal(digits_example, tmp_path):
    from dg2pf_core.job import prune_to_dir

    config = DG2PFConfig(sparsity=0.9, pruning_epochs=1, max_epochs=1, patience=1)
    out = tmp_path / "out"
    metrics = prune_to_dir(PruneJob("digits_cnn", 10, str(digits_example / "model.safetensors"), "digits", config), out)
    assert metrics.sparsity_prunable == pytest.approx(0.9, abs=1e-3)
    dense, compact = out / "model.safetensors", out / "model.compact.safetensors"
    ratio = compact.stat().st_size / dense.stat().st_size
    print(f"digits_cnn at 90%: compact {compact.stat().st_size} B / dense {dense.stat().st_size} B = {ratio:.4f}")
    assert ratio <= 0.15, ratio

    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    logits = []
    for path in (dense, compact):
        model = build_model("digits_cnn", 10).eval()
        load_into(model, read_state_dict(path))
        with torch.no_grad():
            logits.append(model(x))
    assert torch.equal(logits[0], logits[1])
