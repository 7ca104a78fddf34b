"""The image check: every image of a folder dataset decoded once, before training, and cached.

Bad files are real files the test writes: a JPEG cut short, a zero-byte file, text saved as .png.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from dg2pf_core.data import DataRequest, imagecheck, load_dataset
from dg2pf_core.data.imagecheck import (
    cache_file,
    describe_failure,
    find_unreadable_images,
    load_image,
)
from dg2pf_core.data.transforms import TransformedView
from dg2pf_core.errors import DatasetError

SKIP_HINT = "remove or fix them, or pass --skip-bad-images (skip_bad_images: true in a job spec)"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch) -> Path:
    directory = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("DG2PF_CACHE_DIR", str(directory))
    return directory


def _jpeg_bytes(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_good(root: Path, counts: dict[str, int], seed: int = 0) -> list[Path]:
    files = []
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / name / f"{i}.jpg"
            path.write_bytes(_jpeg_bytes(seed * 1000 + len(files)))
            files.append(path)
    return files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _load(root: Path, **request):
    return load_dataset(
        f"imagefolder:{root}",
        DataRequest(**{"image_size": 16, "in_channels": 3, "val_fraction": 0.2, **request}),
    )


class _CountOpens:
    """Counts PIL.Image.open calls (from every thread); PIL's behaviour is left as it is."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()
        real_open = PIL.Image.open

        def counting_open(fp, *args, **kwargs):
            with self._lock:
                self.paths.append(getattr(fp, "name", fp))
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(PIL.Image, "open", counting_open)


# ------------------------------------------------------------------------------ bad images named


def test_a_truncated_jpeg_among_good_ones_is_named_before_training(tmp_path):
    _write_good(tmp_path / "train", {"cat": 6, "dog": 6})
    _truncate(tmp_path / "train" / "dog" / "3.jpg")
    with pytest.raises(DatasetError) as info:
        _load(tmp_path)
    message = info.value.message
    assert message.startswith(f"1 image(s) in {str(tmp_path)!r} cannot be read")
    assert f"train{os.sep}dog{os.sep}3.jpg (image file is truncated" in message and "\n" not in message
    assert SKIP_HINT in message
    assert info.value.field == "dataset"


def test_every_kind_of_unreadable_file_is_named_with_its_reason(tmp_path):
    _write_good(tmp_path / "train", {"cat": 3, "dog": 3})
    _write_good(tmp_path / "val", {"cat": 2, "dog": 2}, seed=1)
    _truncate(tmp_path / "train" / "cat" / "0.jpg")
    (tmp_path / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "val" / "dog" / "notes.png").write_text("not an image, whatever the name says")
    with pytest.raises(DatasetError) as info:
        _load(tmp_path)
    message = info.value.message
    assert message.startswith("3 image(s)") and "\n" not in message
    assert f"train{os.sep}cat{os.sep}0.jpg (image file is truncated" in message
    assert f"train{os.sep}cat{os.sep}empty.jpg (empty file (0 bytes))" in message
    assert f"val{os.sep}dog{os.sep}notes.png (cannot identify image file" in message


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    _write_good(tmp_path / "train", {"cat": 2, "dog": 2})
    big = np.zeros((100, 100), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "train" / "cat" / "huge.png")
    # PIL refuses images over twice this many pixels: 100x100 stands in for a 200-megapixel bomb
    # (the 48x48 good ones stay under it)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 2500)
    with pytest.raises(DatasetError, match=r"huge\.png \(too large to decode safely"):
        _load(tmp_path)


def test_large_images_under_the_bomb_limit_load_without_warnings(tmp_path, monkeypatch, recwarn):
    """Images between MAX_IMAGE_PIXELS and twice it are decoded on purpose: no warning per image
    from the check (on its threads) nor from the items training reads."""
    files = _write_good(tmp_path / "train", {"cat": 4, "dog": 4})
    _write_good(tmp_path / "test", {"cat": 2, "dog": 2}, seed=1)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 2000)  # 48x48 = 2304 pixels: just above
    warnings.simplefilter("always")  # each warning recorded, not only the first of its text
    splits = _load(tmp_path)
    for split in (splits.train, splits.val, splits.test):
        for i in range(len(split)):
            split[i]
    # RandomResizedCrop crops near the whole image only sometimes (PIL warns about large crops
    # too): such a crop, always
    cropped = TransformedView(splits.test.base, _CropAllButOneColumn())
    assert [cropped[i][0] for i in range(len(cropped))] == [(47, 48)] * 4
    assert [w for w in recwarn if issubclass(w.category, PIL.Image.DecompressionBombWarning)] == []

    # PIL's warning is silenced only while the dataset reads images, not for the rest of the process
    with pytest.warns(PIL.Image.DecompressionBombWarning):
        Image.open(files[0]).close()


class _CropAllButOneColumn:
    def __call__(self, image: Image.Image) -> tuple[int, int]:
        return image.crop((1, 0, *image.size)).size  # the whole image would be a mere copy


def test_the_message_stays_one_line_whatever_the_file_name(tmp_path):
    files = _write_good(tmp_path / "train", {"cat": 3, "dog": 3})
    odd = files[0].with_name("two\nlines.jpg")
    files[0].rename(odd)
    _truncate(odd)
    with pytest.raises(DatasetError) as info:
        _load(tmp_path)
    assert "\n" not in info.value.message
    assert repr(f"train{os.sep}cat{os.sep}two\nlines.jpg") + " (image file is truncated" in (info.value.message)
    with pytest.raises(DatasetError) as info:
        load_image(str(odd))
    assert "\n" not in info.value.message and repr(str(odd)) in info.value.message


def test_a_caller_s_own_filter_for_the_bomb_warning_is_kept(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    warnings.filterwarnings("ignore", category=PIL.Image.DecompressionBombWarning)
    mine = warnings.filters[0]
    load_image(str(tmp_path / "a.png"))
    assert mine in warnings.filters


def test_a_multi_line_reason_is_made_one_line():
    reason = describe_failure(SyntaxError("broken PNG file\n  chunk IDAT:\tbad CRC\n"))
    assert reason == "broken PNG file chunk IDAT: bad CRC"


def test_more_than_ten_bad_files_list_ten_and_count_all(tmp_path):
    files = _write_good(tmp_path / "train", {"cat": 10, "dog": 10})
    for path in files[:13]:
        _truncate(path)
    with pytest.raises(DatasetError) as info:
        _load(tmp_path)
    message = info.value.message
    assert message.count("(image file is truncated") == 10
    assert "... and 3 more (13 in all)" in message
    assert message.startswith("13 image(s)")


# ----------------------------------------------------------------------------- skip_bad_images


def test_skip_bad_images_loads_the_good_ones_and_counts_the_bad(tmp_path):
    train = _write_good(tmp_path / "train", {"cat": 6, "dog": 6})
    test = _write_good(tmp_path / "test", {"cat": 2, "dog": 3}, seed=1)
    bad = [train[1], train[8], test[4]]
    for path in bad:
        _truncate(path)
    (tmp_path / "train" / "cat" / "zero.jpg").write_bytes(b"")

    splits = _load(tmp_path, skip_bad_images=True)
    expected_skipped = sorted(str(p.relative_to(tmp_path)) for p in bad + [tmp_path / "train" / "cat" / "zero.jpg"])
    assert sorted(splits.skipped_images) == expected_skipped
    assert "4 unreadable image(s) skipped" in splits.description

    assert len(splits.train) + len(splits.val) == 10 and len(splits.test) == 4
    train_paths = {splits.train.dataset.base.samples[i][0] for i in splits.train.indices}
    val_paths = {splits.val.dataset.base.samples[i][0] for i in splits.val.indices}
    assert train_paths | val_paths == {str(p) for p in train if p not in bad}
    assert {path for path, _ in splits.test.base.samples} == {str(p) for p in test if p not in bad}
    for i in range(len(splits.test)):  # every item left decodes
        assert splits.test[i][0].shape == (3, 16, 16)


@pytest.mark.parametrize("splits_present", [("train",), ("train", "val"), ("train", "test"), ("train", "val", "test")])
def test_skip_bad_images_works_for_every_layout(tmp_path, splits_present):
    """What ``dg2pf evaluate --skip-bad-images`` relies on: a bad image in any split, train
    included, is left out whichever folders the dataset has, and every item left decodes."""
    counts = {
        "train": {"cat": 5, "dog": 5}, "val": {"cat": 2, "dog": 3}, "test": {"cat": 3, "dog": 2}
    }  # fmt: skip
    written = {name: _write_good(tmp_path / name, counts[name], seed=i)
               for i, name in enumerate(splits_present)}  # fmt: skip
    bad = [files[-1] for files in written.values()]  # one in each split present
    for path in bad:
        _truncate(path)

    with pytest.raises(DatasetError, match="cannot be read"):
        _load(tmp_path)
    splits = _load(tmp_path, skip_bad_images=True)

    assert sorted(splits.skipped_images) == sorted(str(p.relative_to(tmp_path)) for p in bad)
    assert f"{len(bad)} unreadable image(s) skipped" in splits.description
    # one bad image left out of each folder, whichever role the folder plays
    sizes = {
        ("train",): (9, None),
        ("train", "val"): (9, 4),  # val/ becomes the test split
        ("train", "test"): (9, 4),
        ("train", "val", "test"): (13, 4),  # train + val, as val/ is the validation split
    }[splits_present]
    assert len(splits.train) + len(splits.val) == sizes[0]
    assert (None if splits.test is None else len(splits.test)) == sizes[1]
    for split in (splits.train, splits.val, splits.test):
        for i in range(len(split) if split is not None else 0):
            assert split[i][0].shape == (3, 16, 16)


def test_skipping_every_image_of_a_class_is_refused(tmp_path):
    files = _write_good(tmp_path / "train", {"cat": 3, "dog": 2})
    for path in files[3:]:
        _truncate(path)
    with pytest.raises(DatasetError, match="no readable image left in class folder.* dog"):
        _load(tmp_path, skip_bad_images=True)


def test_skip_bad_images_must_be_a_bool(tmp_path):
    with pytest.raises(DatasetError) as info:
        _load(tmp_path, skip_bad_images="yes")
    assert info.value.field == "skip_bad_images"


def test_a_file_that_goes_bad_after_the_check_is_named_when_loaded(tmp_path):
    files = _write_good(tmp_path / "train", {"cat": 3, "dog": 3})
    splits = _load(tmp_path)
    _truncate(files[0])
    items = [splits.train, splits.val]
    expected = re.escape(f"{files[0]} cannot be read: image file is truncated")
    with pytest.raises(DatasetError, match=expected):
        for split in items:
            for i in range(len(split)):
                split[i]
    with pytest.raises(DatasetError, match="cannot be read"):
        load_image(str(files[0]))


def test_folder_datasets_pickle_for_dataloader_workers(tmp_path):
    _write_good(tmp_path / "train", {"cat": 3, "dog": 3})
    splits = _load(tmp_path)
    copy = pickle.loads(pickle.dumps(splits.train))
    assert copy[0][0].shape == (3, 16, 16)


# ------------------------------------------------------------------------------------- the cache


def test_a_second_check_decodes_nothing(tmp_path, cache_dir, monkeypatch):
    files = _write_good(tmp_path / "train", {"cat": 4, "dog": 4})
    _truncate(files[2])
    paths = [str(p) for p in files]

    first = find_unreadable_images(str(tmp_path), paths)
    assert [b.relative_path for b in first] == [str(files[2].relative_to(tmp_path))]

    cached = json.loads(cache_file(str(tmp_path)).read_text())
    assert cache_file(str(tmp_path)).parent == cache_dir / "imagecheck"
    assert cached["root"] == str(tmp_path) and cached["format"] == "dg2pf-imagecheck"
    assert len(cached["files"]) == 8
    entry = cached["files"][str(files[2].relative_to(tmp_path))]
    st = files[2].stat()
    assert entry[:2] == [st.st_size, st.st_mtime_ns] and "truncated" in entry[2]
    assert cached["files"][str(files[0].relative_to(tmp_path))][2] is None

    opens = _CountOpens(monkeypatch)
    mtime_before = cache_file(str(tmp_path)).stat().st_mtime_ns
    second = find_unreadable_images(str(tmp_path), paths)
    assert opens.paths == []  # verdicts, bad one included, came from the cache
    assert second == first
    assert cache_file(str(tmp_path)).stat().st_mtime_ns == mtime_before  # not rewritten


def test_a_changed_file_is_checked_again(tmp_path, monkeypatch):
    files = _write_good(tmp_path / "train", {"cat": 3, "dog": 3})
    paths = [str(p) for p in files]
    assert find_unreadable_images(str(tmp_path), paths) == []

    _truncate(files[4])  # new size
    fixed_later = files[1]
    st = fixed_later.stat()
    os.utime(fixed_later, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, new mtime
    opens = _CountOpens(monkeypatch)
    bad = find_unreadable_images(str(tmp_path), paths)
    assert sorted(opens.paths) == sorted([str(files[4]), str(fixed_later)])
    assert [b.path for b in bad] == [str(files[4])]

    files[4].write_bytes(_jpeg_bytes(99))  # fixed: readable again
    assert find_unreadable_images(str(tmp_path), paths) == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"{not json",
        b"\xff\xfe\x00binary",
        b"[1, 2, 3]",
        b'{"format": "dg2pf-imagecheck", "version": 1, "root": "/elsewhere", "files": {}}',
        b'{"format": "dg2pf-imagecheck", "version": 1, "root": "ROOT", "files": {"K": "odd"}}',
    ],
)
def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path, garbage):
    files = _write_good(tmp_path / "train", {"cat": 2, "dog": 2})
    _truncate(files[0])
    target = cache_file(str(tmp_path))
    target.parent.mkdir(parents=True, exist_ok=True)
    key = str(files[0].relative_to(tmp_path))
    target.write_bytes(garbage.replace(b"ROOT", str(tmp_path).encode()).replace(b"K", key.encode()))

    bad = find_unreadable_images(str(tmp_path), [str(p) for p in files])
    assert [b.path for b in bad] == [str(files[0])]
    rebuilt = json.loads(target.read_text())
    assert rebuilt["root"] == str(tmp_path) and len(rebuilt["files"]) == 4


def test_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    files = _write_good(tmp_path / "train", {"cat": 2, "dog": 2})
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("DG2PF_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not write the image check cache"):
        assert find_unreadable_images(str(tmp_path), [str(p) for p in files]) == []


def test_the_cache_is_one_file_per_dataset_root(tmp_path, cache_dir):
    for name in ("a", "b"):
        _write_good(tmp_path / name / "train", {"cat": 2, "dog": 2})
        _load(tmp_path / name)
    files = sorted((cache_dir / "imagecheck").iterdir())
    assert [f.suffix for f in files] == [".json", ".json"]  # no temporary files left behind
    assert cache_file(str(tmp_path / "a")) != cache_file(str(tmp_path / "b"))
    assert cache_file(str(tmp_path / "a")) == cache_file(str(tmp_path / "a" / ".." / "a"))


def test_many_files_are_checked_in_chunks(tmp_path, monkeypatch):
    """Paths are streamed through the pool a chunk at a time; every file gets its verdict."""
    monkeypatch.setattr(imagecheck, "_CHUNK", 7)
    files = _write_good(tmp_path / "train", {"cat": 30, "dog": 25})
    for path in files[5::11]:
        _truncate(path)
    bad = find_unreadable_images(str(tmp_path), (str(p) for p in files), workers=3)
    assert [b.path for b in bad] == [str(p) for p in files[5::11]]


def test_an_interrupted_check_keeps_what_it_learnt(tmp_path, monkeypatch):
    """Ctrl-C during a long first check: the next run decodes only what was not reached."""
    monkeypatch.setattr(imagecheck, "_CHUNK", 5)
    files = _write_good(tmp_path / "train", {"cat": 12, "dog": 12})
    paths = [str(p) for p in files]
    real_open = PIL.Image.open

    def interrupted_at_file_13(fp, *args, **kwargs):
        if getattr(fp, "name", None) == paths[13]:
            raise KeyboardInterrupt  # what Ctrl-C raises; pool.map hands it to the caller
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", interrupted_at_file_13)
    with pytest.raises(KeyboardInterrupt):
        find_unreadable_images(str(tmp_path), paths, workers=1)
    monkeypatch.setattr(PIL.Image, "open", real_open)
    saved = json.loads(cache_file(str(tmp_path)).read_text())["files"]
    assert set(saved) == {str(p.relative_to(tmp_path)) for p in files[:13]}

    opens = _CountOpens(monkeypatch)
    assert find_unreadable_images(str(tmp_path), paths) == []
    assert sorted(opens.paths) == sorted(paths[13:])
