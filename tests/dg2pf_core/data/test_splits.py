"""The validation hold-out is stratified: every class keeps training images, classes are held out in
proportion, and classes with few training images are named in a warning."""

from collections import Counter

import PIL.Image
import pytest

from dg2pf_core.data import DataRequest, load_dataset
from dg2pf_core.data.splits import MIN_TRAIN_PER_CLASS, hold_out_indices
from dg2pf_core.errors import DatasetError


@pytest.mark.parametrize("seed", range(5))
def test_every_class_trains_shares_are_proportional_and_the_count_is_as_without_labels(seed):
    labels = [0] * 60 + [1] * 30 + [2] * 9 + [3] * 1  # a class with a single image
    train, val = hold_out_indices(len(labels), 0.2, seed, labels)
    assert len(val) == round(100 * 0.2) and sorted(train + val) == list(range(100))
    held = Counter(labels[i] for i in val)
    assert held[3] == 0 and Counter(labels[i] for i in train)[3] == 1  # never its last image
    assert held[0] == 12 and held[1] == 6 and held[2] in (1, 2)  # in proportion (largest remainders)
    assert hold_out_indices(len(labels), 0.2, seed, labels) == (train, val)  # deterministic
    with pytest.raises(DatasetError, match="too few"):
        hold_out_indices(3, 0.5, seed, [0, 1, 2])  # one image per class: nothing can be held out


def test_a_folder_with_rare_classes_trains_on_all_of_them_and_warns(tmp_path):
    root = tmp_path / "data"
    sizes = {"common": 20, "rare": 1, "few": 3}
    for name, count in sizes.items():
        (root / "train" / name).mkdir(parents=True)
        for i in range(count):
            PIL.Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(root / "train" / name / f"{i}.png")
    splits = load_dataset(f"imagefolder:{root}", DataRequest(16, 3, val_fraction=0.2))
    names = splits.class_names
    trained = Counter(names[splits.train.dataset.base.targets[i]] for i in splits.train.indices)
    assert trained["rare"] == 1 and all(trained[c] >= 1 for c in sizes)
    assert len(splits.warnings) == 1
    warning = splits.warnings[0]
    assert (
        f"fewer than {MIN_TRAIN_PER_CLASS} training images" in warning and "'rare' 1" in warning and "'few'" in warning
    )
    assert "'common'" not in warning


def _folder(root, split, classes, n=3):
    for cls in classes:
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(n):
            PIL.Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")


def test_a_class_spelled_nfc_in_train_and_nfd_in_test_is_one_class_with_a_note(tmp_path):
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    _folder(tmp_path, "train", [nfc, "tea"])
    _folder(tmp_path, "test", [nfd, "tea"])
    splits = load_dataset(f"imagefolder:{tmp_path}", DataRequest(8, 3, val_fraction=0.2))
    assert splits.class_names == [nfc, "tea"]
    test = splits.test.base
    assert {test.classes[t] for t in test.targets} == {nfc, "tea"} and sorted(set(test.targets)) == [0, 1]
    assert any("another Unicode form" in w and "taken as the same classes" in w for w in splits.warnings)


def test_a_class_folder_name_that_is_not_utf8_is_refused_with_its_bytes(tmp_path):
    import os

    _folder(tmp_path, "train", ["tea", os.fsdecode(b"caf\xe9")])
    with pytest.raises(DatasetError, match=r"not valid UTF-8: b'caf\\xe9'"):
        load_dataset(f"imagefolder:{tmp_path}", DataRequest(8, 3, val_fraction=0.2))
