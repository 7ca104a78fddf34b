"""Datasets confined to allowed roots: links out, hard links, and a link swapped in after the check."""

from __future__ import annotations

import os

import pytest

from dg2pf_core.data.roots import check_tree, confined_open
from dg2pf_core.errors import DatasetError


@pytest.fixture
def layout(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data" / "train" / "a").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"outside")
    (root / "data" / "train" / "a" / "0.png").write_bytes(b"inside")
    (root / "elsewhere.png").write_bytes(b"inside the root, another folder")
    return root, outside


def test_a_tree_with_links_inside_the_roots_passes(layout):
    root, _ = layout
    os.symlink(root / "elsewhere.png", root / "data" / "train" / "a" / "1.png")
    check_tree(str(root / "data"), [str(root)])
    check_tree(str(root / "data"), [])  # unconfined: nothing checked


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda root, out: os.symlink(out / "secret.png", root / "data" / "train" / "a" / "1.png"), "symbolic link"),
        (lambda root, out: os.symlink(out, root / "data" / "train" / "b"), "symbolic link"),
        (lambda root, out: os.link(out / "secret.png", root / "data" / "train" / "a" / "2.png"), "hard link"),
    ],
)
def test_links_out_of_the_roots_are_refused_naming_them(layout, make, needle):
    root, outside = layout
    make(root, outside)
    with pytest.raises(DatasetError, match=needle) as info:
        check_tree(str(root / "data"), [str(root)])
    assert "train/" in info.value.message and "\n" not in info.value.message


def test_a_dataset_folder_that_is_itself_a_link_out_is_refused(layout):
    root, outside = layout
    os.symlink(outside, root / "escape")
    with pytest.raises(DatasetError, match="outside the allowed roots"):
        check_tree(str(root / "escape"), [str(root)])


def test_a_file_swapped_for_a_link_after_the_check_is_not_read(layout):
    root, outside = layout
    image = root / "data" / "train" / "a" / "0.png"
    check_tree(str(root / "data"), [str(root)])
    image.unlink()
    os.symlink(outside / "secret.png", image)  # swapped in after the check
    with pytest.raises(DatasetError, match="outside the allowed roots"):
        confined_open(str(image), [str(root)])
    with confined_open(str(image), []) as fh:  # unconfined (the command line): read as asked
        assert fh.read() == b"outside"


def test_an_imagefolder_job_reads_no_image_swapped_for_a_link_out(tmp_path):
    from PIL import Image

    from dg2pf_core.data import DataRequest, load_dataset

    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    Image.new("L", (8, 8), 200).save(outside / "secret.png")
    for cls in ("a", "b"):
        (root / "ds" / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 10 * i).save(root / "ds" / "train" / cls / f"{i}.png")
    request = DataRequest(image_size=8, in_channels=1, allowed_roots=(str(root),))
    splits = load_dataset(f"imagefolder:{root / 'ds'}", request)
    victim = root / "ds" / "train" / "a" / "0.png"
    victim.unlink()
    os.symlink(outside / "secret.png", victim)  # swapped while the job trains
    with pytest.raises(DatasetError, match="outside the allowed roots"):
        for split in (splits.train, splits.val):
            [split[i] for i in range(len(split))]


def _two_hops(root, out):
    # data/train/b -> mid (inside the root), whose file links out: the walk must go through the folder link.
    (root / "mid").mkdir()
    os.symlink(out / "secret.png", root / "mid" / "x.png")
    os.symlink(root / "mid", root / "data" / "train" / "b")


def test_a_link_out_reached_through_a_folder_link_inside_the_roots_is_refused(layout):
    root, outside = layout
    _two_hops(root, outside)
    with pytest.raises(DatasetError, match="symbolic link"):
        check_tree(str(root / "data"), [str(root)])


def test_folder_link_cycles_end(layout):
    root, _ = layout
    os.symlink(root / "data", root / "data" / "train" / "loop")
    check_tree(str(root / "data"), [str(root)])


def test_cifar10_batches_are_read_confined(tmp_path):
    from dg2pf_core.data.cifar10 import _load_batch

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "data_batch_1").write_bytes(b"not read")
    os.symlink(outside / "data_batch_1", root / "data_batch_1")
    with pytest.raises(DatasetError, match="outside the allowed roots"):
        _load_batch(str(root / "data_batch_1"), [str(root)])


def test_a_path_given_as_bytes_is_read_and_one_with_a_nul_is_refused_in_words(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"inside")
    with confined_open(str(tmp_path / "a.bin").encode(), [str(tmp_path)]) as fh:
        assert fh.read() == b"inside" and fh.name == str(tmp_path / "a.bin")
    with pytest.raises(DatasetError, match="NUL"):
        confined_open(str(tmp_path / "a\0.bin"), [str(tmp_path)])
