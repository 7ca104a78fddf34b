import gzip
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

from dg2pf_core.errors import CheckpointError
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.io.checkpoints import file_sha256, load_into, read_state_dict
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


# --- recognising files by content ------------------------------------------------------------


def _refusal(path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "\n" not in msg
    return msg


def test_git_lfs_pointer_is_refused_with_lfs_advice(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 44739242\n"
    )
    msg = _refusal(path)
    assert "Git LFS pointer" in msg and "44.7 MB" in msg
    assert "git lfs pull" in msg and "download the real file" in msg
    assert "pickled" not in msg


@pytest.mark.parametrize("start", ["<!DOCTYPE html>", "\ufeff\n  <html lang='en'>", "<!doctype HTML>"])
def test_html_page_is_refused_with_redownload_advice(tmp_path, start):
    path = tmp_path / "model.pth"
    path.write_text(f"{start}<head><title>Download model.pth</title></head><body>...</body></html>")
    msg = _refusal(path)
    assert "an HTML page, not a checkpoint" in msg
    assert "re-download it" in msg
    assert "pickled" not in msg


def test_xml_error_response_is_refused_quoting_it(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text('<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>')
    msg = _refusal(path)
    assert "an XML document" in msg and "AccessDenied" in msg and "re-download it" in msg


def test_text_file_is_refused_quoting_its_first_characters(tmp_path):
    path = tmp_path / "model.bin"
    path.write_text('{"error": "Repository not found", "status": 404}\n' + "x" * 500)
    msg = _refusal(path)
    assert "a JSON text file, not a checkpoint" in msg
    assert '\'{"error": "Repository not found", "status": 404} xxxxxxxxxxx...\'' in msg
    assert "x" * 20 not in msg  # about 60 characters are quoted, not the whole file
    assert "re-download it" in msg

    # Windows PowerShell saves redirected output as UTF-16.
    utf16 = tmp_path / "ps.pt"
    utf16.write_bytes("curl : (404) Not Found".encode("utf-16"))
    assert "a text file, not a checkpoint (it begins: 'curl : (404) Not Found')" in _refusal(utf16)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, but users still have the files
def test_torchscript_archive_is_refused_with_state_dict_advice(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(nn.Linear(3, 2)), str(path))
    msg = _refusal(path)
    assert "a TorchScript archive" in msg and "does not run" in msg
    assert "torch.jit.load(f).state_dict()" in msg and "torch.save" in msg and "safetensors" in msg
    assert "corrupt" not in msg


def test_safetensors_content_named_bin_loads(tmp_path, digits_state):
    path = tmp_path / "model.bin"
    save_state_dict(digits_state, path)
    _assert_same(read_state_dict(path), digits_state)


def test_compact_artifact_with_any_name_loads(tmp_path, digits_state):
    from dg2pf_core.io.compact import save_compact

    pruned = {k: v * (torch.rand_like(v) > 0.9) if v.is_floating_point() else v for k, v in digits_state.items()}
    for name in ("model.compact.safetensors", "model.bin", "weights"):
        path = tmp_path / name
        save_compact(pruned, path)
        _assert_same(read_state_dict(path), pruned)


def test_torch_zip_named_safetensors_loads(tmp_path, digits_state):
    path = tmp_path / "model.safetensors"
    torch.save(digits_state, path)
    _assert_same(read_state_dict(path), digits_state)


def test_misnamed_file_that_fails_to_load_names_the_mismatch(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"weight": torch.zeros(2), "m": nn.Linear(2, 2)}, path)
    msg = _refusal(path)
    assert "named .safetensors but it is a torch.save zip file" in msg
    assert "pickled Python objects" in msg


def test_legacy_torch_save_loads(tmp_path, digits_state):
    path = tmp_path / "old.pth"
    torch.save(digits_state, path, _use_new_zipfile_serialization=False)
    _assert_same(read_state_dict(path), digits_state)


def test_safetensors_whose_length_looks_like_a_pickle_loads(tmp_path):
    # A header of 0x380 bytes starts the file with b"\x80\x03", a pickle's first two bytes.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header = header.ljust(0x380, b" ")
    path = tmp_path / "w.pt"
    path.write_bytes(len(header).to_bytes(8, "little") + header + struct.pack("<2f", 1.5, -2.0))
    assert path.read_bytes()[:2] == b"\x80\x03"
    assert torch.equal(read_state_dict(path)["w"], torch.tensor([1.5, -2.0]))


@pytest.mark.parametrize("data", [{"a": [1, 2, 3], "b": ["x"]}, "state_dict"])
def test_plain_pickle_is_refused_with_torch_save_advice(tmp_path, digits_state, data):
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump(digits_state if data == "state_dict" else data, f)
    msg = _refusal(path)
    assert "plain Python pickle" in msg and "not a torch.save file" in msg
    assert "model.state_dict()" in msg and "torch.save" in msg and ".safetensors" in msg


def _gzip(path):
    path.write_bytes(gzip.compress(b"not a checkpoint" * 10))


def _folder_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("run/config.json", "{}")
        z.writestr("run/model.safetensors", b"\x00" * 16)


def _npz(path):
    with open(path, "wb") as f:
        np.savez(f, weight=np.zeros(3))


def _npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))


@pytest.mark.parametrize(
    ("write", "what", "advice"),
    [
        (_gzip, "a gzip-compressed file", "decompress it"),
        (_folder_zip, "a zip archive (run/config.json, run/model.safetensors)", "extract it"),
        (_npz, "a NumPy .npz archive", "convert the weights to a PyTorch state_dict"),
        (_npy, "a NumPy .npy array", "state_dict"),
    ],
)
def test_archives_and_arrays_are_refused_saying_what_they_are(tmp_path, write, what, advice):
    path = tmp_path / "model.pt"
    write(path)
    msg = _refusal(path)
    assert f"is {what}" in msg and advice in msg


def test_safetensors_cut_inside_its_header_is_truncated(tmp_path, digits_state):
    full = tmp_path / "full.safetensors"
    save_state_dict(digits_state, full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:40])
    msg = _refusal(cut)
    assert "truncated or corrupt" in msg and "download it again" in msg


def test_unknown_binary_is_refused_showing_its_first_bytes(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(256)))
    msg = _refusal(path)
    assert "00 01 02 03 04 05 06 07" in msg and "truncated or corrupt" in msg


# --- unwrapping containers ------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_compile_and_ddp_prefixes_are_unwrapped(tmp_path, digits_state, prefix):
    path = tmp_path / "compiled.pt"
    torch.save({f"{prefix}{k}": v for k, v in digits_state.items()}, path)
    loaded = read_state_dict(path)
    _assert_same(loaded, digits_state)
    load_into(build_model("digits_cnn", num_classes=10), loaded)


def test_prefix_is_kept_unless_every_key_has_it(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"_orig_mod.a": torch.zeros(1), "b": torch.zeros(1)}, path)
    assert sorted(read_state_dict(path)) == ["_orig_mod.a", "b"]
    bare = tmp_path / "bare.pt"
    torch.save({"module.": torch.zeros(1)}, bare)  # stripping would leave no name
    assert list(read_state_dict(bare)) == ["module."]


def _lightning(state: dict, **markers) -> dict:
    return {
        **markers,
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "widths": [16, 32], "arch": "digits_cnn"},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {"best_model_score": 0.9}},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]}],
        "lr_schedulers": [{"last_epoch": 3}],
    }


@pytest.mark.parametrize(
    "markers",
    [{"pytorch-lightning_version": "2.4.0", "epoch": 3, "global_step": 120}, {"epoch": 3, "global_step": 120}],
)
def test_lightning_checkpoint_is_unwrapped(tmp_path, digits_state, markers):
    path = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(_lightning(digits_state, **markers), path)
    loaded = read_state_dict(path)
    _assert_same(loaded, digits_state)
    load_into(build_model("digits_cnn", num_classes=10), loaded)


def test_lightning_prefix_is_stripped_only_when_every_key_has_it(tmp_path, digits_state):
    ckpt = _lightning(digits_state, **{"pytorch-lightning_version": "2.4.0"})
    ckpt["state_dict"]["teacher.w"] = torch.zeros(1)
    path = tmp_path / "mixed.ckpt"
    torch.save(ckpt, path)
    assert "teacher.w" in read_state_dict(path) and "model.classifier.weight" in read_state_dict(path)

    # Without Lightning's markers a "model." prefix is a real module name and stays.
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, plain)
    assert list(read_state_dict(plain)) == ["model.w"]


# --- what the tensors hold ------------------------------------------------------------------


def test_non_finite_weights_are_refused_naming_tensors(tmp_path, digits_state):
    state = {k: v.clone() for k, v in digits_state.items()}
    names = [k for k, v in state.items() if v.is_floating_point()]
    state[names[0]].view(-1)[:3] = float("nan")
    state[names[1]].view(-1)[0] = float("-inf")
    for path in (tmp_path / "bad.safetensors", tmp_path / "bad.pt"):
        if path.suffix == ".pt":
            torch.save(state, path)
        else:
            save_state_dict(state, path)
        msg = _refusal(path)
        assert "has non-finite values in 2 tensors" in msg
        assert f"{names[0]}: 3 NaN" in msg and f"{names[1]}: 1 Inf" in msg
        assert "re-export it from a healthy training run" in msg
        assert torch.isnan(read_state_dict(path, allow_nonfinite=True)[names[0]]).sum() == 3


def test_non_finite_half_precision_is_refused(tmp_path):
    path = tmp_path / "half.safetensors"
    save_state_dict(
        {
            "a": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16),
            "b": torch.tensor([float("nan"), float("inf")], dtype=torch.float16),
            "steps": torch.tensor(3),
        },
        path,
    )
    msg = _refusal(path)
    assert "in 2 tensors" in msg and "a: 1 Inf" in msg and "b: 1 NaN and 1 Inf" in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stored_dtype_is_kept(tmp_path, digits_state, suffix, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in digits_state.items()}
    path = tmp_path / f"half{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_state_dict(state, path)
    loaded = read_state_dict(path)
    _assert_same(loaded, state)
    assert {v.dtype for v in loaded.values() if v.is_floating_point()} == {dtype}


def test_float8_weights_are_checked_for_nan_and_load_as_float32(tmp_path, digits_state):
    # isfinite has no CPU kernel for float8_e4m3fn; the check must still see the NaN.
    state = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in digits_state.items()}
    path = tmp_path / "fp8.pt"
    torch.save(state, path)
    model = build_model("digits_cnn", num_classes=10)
    load_into(model, read_state_dict(path))
    assert model.state_dict()["classifier.weight"].dtype == torch.float32

    state["classifier.bias"] = torch.tensor([float("nan")] * 10).to(torch.float8_e4m3fn)
    torch.save(state, path)
    assert "classifier.bias: 10 NaN" in _refusal(path)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (
            lambda v: torch.empty_like(v, device="meta"),
            "holds no data (saved from a model on the 'meta' device: materialise it first)",
        ),
        (lambda v: v.to_sparse(), "is a sparse tensor; save dense weights (tensor.to_dense())"),
        (lambda v: v.to_sparse_csr(), "is a sparse tensor; save dense weights (tensor.to_dense())"),
        (lambda v: v.to_sparse_csc(), "is a sparse tensor; save dense weights (tensor.to_dense())"),
        (lambda v: v.to_sparse_bsr((1, 1)), "is a sparse tensor; save dense weights (tensor.to_dense())"),
        (
            lambda v: torch.quantize_per_tensor(v, 0.1, 0, torch.qint8),
            "is quantized (qint8), and quantized checkpoints are not supported",
        ),
        (lambda v: torch.nested.nested_tensor(list(v), layout=torch.jagged), "is a nested tensor"),
    ],
    ids=["meta", "coo", "csr", "csc", "bsr", "quantized", "nested"],
)
@pytest.mark.parametrize("allow_nonfinite", [False, True])
@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized and nested tensors are deprecated/prototype
def test_tensors_without_dense_cpu_data_are_refused_naming_them(tmp_path, digits_state, make, says, allow_nonfinite):
    state = dict(digits_state)
    state["classifier.weight"] = make(state["classifier.weight"])
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path, allow_nonfinite=allow_nonfinite)
    msg = str(info.value)
    assert msg == f"checkpoint {path}'s tensor classifier.weight {says}" or msg.startswith(
        f"checkpoint {path}'s tensor classifier.weight {says}"
    )
    assert "\n" not in msg


def test_whole_meta_model_is_refused_listing_a_few_tensors(tmp_path, digits_state):
    path = tmp_path / "meta.pt"
    torch.save({k: torch.empty_like(v, device="meta") for k, v in digits_state.items()}, path)
    msg = _refusal(path)
    assert msg == (
        f"checkpoint {path}'s tensors features.0.weight, features.1.weight, features.1.bias and 17 more "
        "hold no data (saved from a model on the 'meta' device: materialise it first)"
    )


def test_several_kinds_of_unusable_tensor_are_named_in_one_line(tmp_path, digits_state):
    state = dict(digits_state)
    state["features.0.weight"] = torch.empty_like(state["features.0.weight"], device="meta")
    state["classifier.weight"] = state["classifier.weight"].to_sparse()
    state["classifier.bias"] = state["classifier.bias"].to_sparse()
    path = tmp_path / "mixed.pt"
    torch.save(state, path)
    msg = _refusal(path)
    assert "tensor features.0.weight holds no data" in msg
    assert "tensors classifier.weight, classifier.bias are sparse tensors" in msg


def test_unconvertible_float_dtype_is_refused(tmp_path):
    path = tmp_path / "fp4.pt"
    torch.save({"w": torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, path)
    msg = _refusal(path)
    assert "tensor w is float4_e2m1fn_x2, which PyTorch cannot convert to float32" in msg
    assert "save float32, float16 or bfloat16 weights" in msg


def test_load_into_refuses_sparse_and_meta_tensors_given_directly(digits_state):
    model = build_model("digits_cnn", num_classes=10)
    state = dict(digits_state)
    state["classifier.weight"] = state["classifier.weight"].to_sparse()
    with pytest.raises(CheckpointError, match=r"^checkpoint's tensor classifier.weight is a sparse tensor"):
        load_into(model, state)
    state["classifier.weight"] = torch.empty(10, 128, device="meta")
    with pytest.raises(CheckpointError, match="classifier.weight holds no data"):
        load_into(model, state, what="teacher checkpoint /p/t.pt")


# --- torchvision models that version their weights ------------------------------------------


@pytest.mark.parametrize("writer", ["save_state_dict", "torch.save"])
def test_mnasnet_checkpoint_loads_into_a_fresh_model(tmp_path, writer):
    # MNASNet reads its version from the state_dict's metadata, which files do not keep.
    torch.manual_seed(0)
    state = build_model("torchvision/mnasnet0_5", 2).state_dict()
    path = tmp_path / ("m.safetensors" if writer == "save_state_dict" else "m.pt")
    if writer == "save_state_dict":
        save_state_dict(state, path)
    else:
        torch.save(state, path)
    model = build_model("torchvision/mnasnet0_5", 2)
    load_into(model, read_state_dict(path), what=f"checkpoint {path}", arch="torchvision/mnasnet0_5")
    _assert_same(model.state_dict(), state)

    plain = {k: v.clone() for k, v in state.items()}  # a plain dict handed in directly
    load_into(build_model("torchvision/mnasnet0_5", 2), plain)


def test_checkpoint_without_batchnorm_counters_still_loads(digits_state):
    model = build_model("digits_cnn", num_classes=10)
    model.features[1].num_batches_tracked.fill_(7)
    state = {k: v for k, v in digits_state.items() if not k.endswith("num_batches_tracked")}
    load_into(model, state)
    loaded = model.state_dict()
    assert loaded["features.1.num_batches_tracked"] == 7  # the model keeps its own counter
    assert torch.equal(loaded["classifier.weight"], digits_state["classifier.weight"])


# --- training checkpoints -------------------------------------------------------------------


def _tutorial_checkpoint(state: dict, key: str = "model_state_dict") -> dict:
    optimizer = torch.optim.SGD(build_model("digits_cnn", num_classes=10).parameters(), lr=0.1, momentum=0.9)
    return {"epoch": 5, key: state, "optimizer_state_dict": optimizer.state_dict(), "loss": torch.tensor(0.25)}


@pytest.mark.parametrize("key", ["model_state_dict", "model_state", "net", "network", "state_dict", "model"])
def test_training_checkpoint_weights_are_unwrapped(tmp_path, digits_state, key):
    path = tmp_path / "tutorial.tar"
    torch.save(_tutorial_checkpoint(digits_state, key), path)
    loaded = read_state_dict(path)
    _assert_same(loaded, digits_state)
    load_into(build_model("digits_cnn", num_classes=10), loaded)


def test_model_and_optimizer_checkpoint_still_unwraps_model(tmp_path, digits_state):
    optimizer = torch.optim.Adam(build_model("digits_cnn", num_classes=10).parameters())
    path = tmp_path / "run.pt"
    torch.save({"model": digits_state, "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    _assert_same(read_state_dict(path), digits_state)


def test_several_weight_entries_prefer_state_dict_then_model_state_dict(tmp_path, digits_state):
    other = {k: torch.zeros_like(v) for k, v in digits_state.items()}
    path = tmp_path / "both.pt"
    torch.save({"model": other, "model_state_dict": digits_state, "net": other}, path)
    _assert_same(read_state_dict(path), digits_state)
    torch.save({"model_state_dict": other, "state_dict": digits_state}, path)
    _assert_same(read_state_dict(path), digits_state)
    # An entry that holds no tensors (a config) loses to one that does, whatever the order.
    torch.save({"model": {"arch": "digits_cnn", "width": 32}, "network": digits_state}, path)
    _assert_same(read_state_dict(path), digits_state)


def test_weights_under_an_unknown_key_are_refused_with_advice(tmp_path, digits_state):
    path = tmp_path / "ema.pt"
    torch.save({"model_ema": digits_state, "optimizer": {"lr": 0.1}, "epoch": 2}, path)
    msg = _refusal(path)
    assert "maps 'model_ema' to a dict, not a tensor" in msg
    assert "'model_state_dict'" in msg and "torch.save(checkpoint['model_ema'], 'model.pt')" in msg


@pytest.mark.parametrize(
    "raw_key, ema_key",
    [("state_dict", "state_dict_ema"), ("model", "model_ema"), ("model_state_dict", "ema_state_dict")],
)
def test_raw_and_ema_weights_in_one_file_are_refused_naming_both_until_one_is_chosen(
    tmp_path, digits_state, raw_key, ema_key
):
    """timm's --model-ema checkpoints (state_dict + state_dict_ema), torchvision's references (model +
    model_ema): the raw weights were taken without a word; now the file is refused naming both entries and
    the option, and the key chosen is the set read. A check that only needs a readable file takes either."""
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in digits_state.items()}
    path = tmp_path / "train.pth"
    torch.save({raw_key: digits_state, ema_key: ema, "optimizer": {"lr": 0.1}, "epoch": 9}, path)
    msg = _refusal(path)
    assert "two sets of weights" in msg and f"'{raw_key}'" in msg and f"'{ema_key}'" in msg
    assert f"--checkpoint-key {ema_key}" in msg and "model.checkpoint_key" in msg
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert info.value.field == "checkpoint_key"
    _assert_same(read_state_dict(path, key=ema_key), ema)
    _assert_same(read_state_dict(path, key=raw_key), digits_state)
    _assert_same(read_state_dict(path, any_set=True), digits_state)  # readable: what an upload checks
    with pytest.raises(CheckpointError, match=rf"no set of weights under 'optimizer'.*'{raw_key}', '{ema_key}'"):
        read_state_dict(path, key="optimizer")
    torch.save(digits_state, path)  # a plain state_dict: a key is an error that says so
    with pytest.raises(CheckpointError, match="a plain state_dict: leave the key out"):
        read_state_dict(path, key=ema_key)


def test_the_chosen_set_is_what_a_job_prunes(tmp_path, digits_state):
    from dg2pf_core import DG2PFConfig
    from dg2pf_core.job import PruneJob, check_static

    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in digits_state.items()}
    path = tmp_path / "train.pth"
    torch.save({"state_dict": digits_state, "state_dict_ema": ema}, path)
    job = PruneJob(
        arch="digits_cnn",
        num_classes=10,
        checkpoint=str(path),
        dataset="digits",
        config=DG2PFConfig(sparsity=0.5),
        checkpoint_key="state_dict_ema",
    )
    _, model, _, _ = check_static(job)
    _assert_same(model.state_dict(), ema)
    with pytest.raises(CheckpointError, match="two sets of weights"):
        check_static(
            PruneJob(
                arch="digits_cnn",
                num_classes=10,
                checkpoint=str(path),
                dataset="digits",
                config=DG2PFConfig(sparsity=0.5),
            )
        )


# --- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_load_into_refuses_non_floating_weights(digits_state, dtype):
    model = build_model("digits_cnn", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(digits_state)
    state["features.0.weight"] = state["features.0.weight"].to(dtype)
    with pytest.raises(CheckpointError) as info:
        load_into(model, state, what="checkpoint /p/x.pt")
    name = str(dtype).removeprefix("torch.")
    assert str(info.value) == (
        f"checkpoint /p/x.pt's tensor features.0.weight is {name} but the model's is float32: "
        "not weights of this architecture"
    )
    _assert_same(model.state_dict(), before)


def test_load_into_dtype_refusal_names_the_first_few(tmp_path, digits_state):
    path = tmp_path / "ints.safetensors"
    save_state_dict({k: v.to(torch.int32) for k, v in digits_state.items()}, path)
    with pytest.raises(CheckpointError) as info:
        load_into(build_model("digits_cnn", 10), read_state_dict(path), what=f"teacher checkpoint {path}")
    msg = str(info.value)
    assert msg.startswith(f"teacher checkpoint {path}'s tensor features.0.weight is int32 but the model's is float32")
    assert "(and 16 more tensors: features.1.weight, features.1.bias, features.1.running_mean and 13 more)" in msg
    assert msg.endswith(": not weights of this architecture")
    assert "num_batches_tracked" not in msg  # int32 -> int64 counters are fine


def test_load_into_refuses_floating_value_for_integer_buffer(digits_state):
    state = dict(digits_state)
    state["features.1.num_batches_tracked"] = torch.tensor(3.0)
    with pytest.raises(CheckpointError, match="features.1.num_batches_tracked is float32 but the model's is int64"):
        load_into(build_model("digits_cnn", 10), state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_load_into_converts_between_floating_and_between_integer_dtypes(digits_state, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v.to(torch.int32) for k, v in digits_state.items()}
    model = build_model("digits_cnn", 10)
    load_into(model, state)
    loaded = model.state_dict()
    assert loaded["features.0.weight"].dtype == torch.float32
    assert loaded["features.1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(loaded["classifier.bias"], digits_state["classifier.bias"].to(dtype).float())


# --- messages name the file -----------------------------------------------------------------


def test_load_into_message_names_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_state_dict(build_model("digits_cnn", 10).state_dict(), path)
    state = read_state_dict(path)
    del state["features.0.weight"]
    with pytest.raises(CheckpointError) as info:
        load_into(
            build_model("digits_cnn", 100), state, what=f"checkpoint {path}", arch="digits_cnn with num_classes=100"
        )
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {path} does not fit digits_cnn with num_classes=100: ")
    assert "1 key missing from the checkpoint (first: features.0.weight)" in msg
    assert "classifier.weight: checkpoint (10, 128) vs model (100, 128)" in msg
    assert msg.count(str(path)) == 1

    with pytest.raises(CheckpointError) as info:
        load_into(
            build_model("digits_cnn", 100),
            state,
            what=f"teacher checkpoint {path}",
            arch="digits_cnn with num_classes=100",
        )
    msg = str(info.value)
    assert msg.startswith(f"teacher checkpoint {path} does not fit digits_cnn with num_classes=100: ")
    assert "missing from the teacher checkpoint (first" in msg
    assert "classifier.weight: teacher checkpoint (10, 128) vs model (100, 128)" in msg
