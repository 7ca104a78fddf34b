import os
import pickle

import pytest
import torch
import torch.nn as nn

from dg2pf_core.checkpoints import file_sha256, load_into, read_state_dict, save_state_dict
from dg2pf_core.errors import CheckpointError
from dg2pf_core.models import build_model


def _assert_same(a: dict, b: dict) -> None:
    # safetensors does not keep insertion order, so compare as mappings
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def digits_state():
    torch.manual_seed(0)
    return build_model("digits_cnn", num_classes=10).state_dict()


def test_safetensors_roundtrip_is_exact(tmp_path, digits_state):
    path = tmp_path / "w.safetensors"
    save_state_dict(digits_state, path)
    _assert_same(read_state_dict(path), digits_state)
    assert not (tmp_path / "w.safetensors.tmp").exists()


def test_torch_state_dict_roundtrip_is_exact(tmp_path, digits_state):
    path = tmp_path / "w.pt"
    torch.save(digits_state, path)
    _assert_same(read_state_dict(path), digits_state)


def test_wrapped_and_ddp_prefixed_checkpoints_are_unwrapped(tmp_path, digits_state):
    ddp = {f"module.{k}": v for k, v in digits_state.items()}
    path = tmp_path / "train.pth"
    torch.save({"state_dict": ddp, "epoch": 7, "best_acc": 0.9}, path)
    _assert_same(read_state_dict(path), digits_state)

    path2 = tmp_path / "model.pth"
    torch.save({"model": digits_state}, path2)
    _assert_same(read_state_dict(path2), digits_state)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "pickled Python objects" in msg
    assert "state_dict" in msg and ".safetensors" in msg


class _Payload:
    """Unpickling this would create ``marker`` - proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_payload_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.zeros(2), "x": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_state_dict(path)
    assert not marker.exists()


def test_missing_path_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("name", ["empty.pt", "empty.safetensors"])
def test_empty_file_is_a_checkpoint_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(path)


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors"])
@pytest.mark.parametrize("content", [b"hello world, not a checkpoint" * 10, bytes(range(256)) * 4])
def test_garbage_bytes_are_a_checkpoint_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_a_checkpoint_error(tmp_path, digits_state, suffix):
    full = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save(digits_state, full)
    else:
        save_state_dict(digits_state, full)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(cut)


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(2), "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="'lr'"):
        read_state_dict(path)


def test_load_into_names_shape_mismatch(tmp_path):
    path = tmp_path / "c10.safetensors"
    save_state_dict(build_model("cifar/resnet18", num_classes=10).state_dict(), path)
    model = build_model("cifar/resnet18", num_classes=100)
    with pytest.raises(CheckpointError) as info:
        load_into(model, read_state_dict(path), arch="cifar/resnet18")
    msg = str(info.value)
    assert "does not fit cifar/resnet18" in msg
    assert "fc.weight: checkpoint (10, 512) vs model (100, 512)" in msg
    assert "2 shape mismatches" in msg  # fc.weight and fc.bias
    assert "lacks" not in msg and "missing" not in msg


def test_load_into_counts_extra_and_missing_keys(digits_state):
    model = build_model("digits_cnn", num_classes=10)
    state = dict(digits_state)
    del state["classifier.weight"]
    del state["classifier.bias"]
    state["extra.a"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_into(model, state)
    msg = str(info.value)
    assert "1 key the model lacks (first: extra.a)" in msg
    assert "2 keys missing from the checkpoint (first: classifier.weight, classifier.bias)" in msg


def test_load_into_lists_at_most_three_names():
    model = build_model("digits_cnn", num_classes=10)
    with pytest.raises(CheckpointError) as info:
        load_into(model, {f"junk{i}": torch.zeros(1) for i in range(10)})
    msg = str(info.value)
    assert "10 keys the model lacks (first: junk0, junk1, junk2)" in msg
    assert "junk3" not in msg


def test_failed_load_leaves_model_untouched(digits_state):
    model = build_model("digits_cnn", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in digits_state.items()}
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError):
        load_into(model, state)
    _assert_same(model.state_dict(), before)


def test_load_into_converts_dtype_and_copies_values(digits_state):
    model = build_model("digits_cnn", num_classes=10)
    doubled = {k: v.double() if v.is_floating_point() else v for k, v in digits_state.items()}
    load_into(model, doubled)
    loaded = model.state_dict()
    for k, v in digits_state.items():
        assert loaded[k].dtype == v.dtype
        assert torch.equal(loaded[k], v)


def test_ddp_checkpoint_loads_into_model(tmp_path, digits_state):
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in digits_state.items()}, path)
    model = build_model("digits_cnn", num_classes=10)
    load_into(model, read_state_dict(path))
    _assert_same(model.state_dict(), digits_state)


def test_shared_storage_tensors_save_and_roundtrip(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tied = nn.Linear(4, 4)
    state = {
        "a": base,
        "a_again": base,  # tied weights: the same tensor twice
        "view": base[4:8],  # a view into another tensor's storage
        "t": torch.arange(6.0).reshape(2, 3).t(),  # non-contiguous
        "tied.weight": tied.weight,  # requires grad
        "tied.weight2": tied.weight,
    }
    path = tmp_path / "shared.safetensors"
    save_state_dict(state, path)
    back = read_state_dict(path)
    for k, v in state.items():
        assert torch.equal(back[k], v.detach()), k


def test_save_is_atomic_replace(tmp_path, digits_state):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old content")
    save_state_dict(digits_state, path)
    _assert_same(read_state_dict(path), digits_state)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_file_sha256_identifies_content(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"abc")
    assert file_sha256(a) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    b = tmp_path / "b"
    b.write_bytes(b"abd")
    assert file_sha256(b) != file_sha256(a)
