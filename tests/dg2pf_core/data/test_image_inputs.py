"""Images as users bring them: small ones evaluated whole, any aspect ratio bounded, EXIF orientation
applied, decompression bombs refused: alike in training, evaluation and serving."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import PIL.Image
import pytest
import torch
import torchvision.transforms as T

from dg2pf_core.data import DataRequest, eval_transform_for, load_dataset
from dg2pf_core.data.imagecheck import open_image
from dg2pf_core.data.registry import eval_crop_pct
from dg2pf_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MAX_ASPECT, FitAndCrop
from dg2pf_core.errors import DatasetError, InputError
from dg2pf_core.io.inference import InferenceModel


def _noise(w: int, h: int, seed: int) -> PIL.Image.Image:
    g = torch.Generator().manual_seed(seed)
    return PIL.Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _plain(image: PIL.Image.Image) -> torch.Tensor:
    """What a user's own pipeline feeds a 32 px model: the whole image, normalised."""
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(image.convert("RGB")))


def test_images_at_the_target_size_are_evaluated_whole_and_larger_ones_cropped_by_crop_pct(tmp_path):
    root = tmp_path / "folder"
    for label in ("a", "b"):
        (root / "train" / label).mkdir(parents=True)
        for n in range(4):
            _noise(32, 32, 10 * n + ord(label)).save(root / "train" / label / f"{n}.png")
    splits = load_dataset(f"imagefolder:{root}", DataRequest(32, 3, val_fraction=0.25))
    image, _ = splits.val.dataset.base[splits.val.indices[0]]
    assert torch.equal(splits.eval_transform(image), _plain(image))  # no border cut off (it used to lose 11%)
    big = _noise(100, 80, 1)  # larger than 32 / crop_pct: ImageNet's resize + centre crop, at the job's crop_pct
    tf = eval_transform_for(f"imagefolder:{root}", DataRequest(32, 3, crop_pct=0.5))
    expected = T.CenterCrop(32)(T.Resize(64)(big))
    assert torch.equal(tf(big), _plain(expected))
    assert eval_crop_pct(f"imagefolder:{root}", None) == 0.875 and eval_crop_pct(f"imagefolder:{root}", 1.0) == 1.0
    assert eval_crop_pct("digits", None) is None  # fixed-size datasets resize whole: no crop to record
    with pytest.raises(DatasetError, match="crop_pct") as info:
        eval_transform_for(f"imagefolder:{root}", DataRequest(32, 3, crop_pct=0.1))
    assert info.value.field == "crop_pct"


@pytest.mark.parametrize("size", [(1, 16000), (16000, 1), (40, 100_000), (100_000, 300)])
def test_any_aspect_ratio_is_evaluated_within_a_bounded_size(size):
    """The resize before the crop is capped at MAX_ASPECT x the target on its long side (a 1 x 16,000 PNG
    used to become a 5 GB tensor at 224 px); the result is always the target size."""
    f = FitAndCrop(224)
    image = PIL.Image.new("RGB", size)
    resized = f.crop.transforms[0](image) if min(size) > f.short else f.whole(image)
    assert max(resized.size) <= MAX_ASPECT * 224 and resized.size[0] * resized.size[1] <= MAX_ASPECT * 224 * 224
    assert f(image).size == (224, 224)


def _exif_jpeg(path: Path, orientation: int) -> PIL.Image.Image:
    """A JPEG whose pixels are stored sideways with an EXIF Orientation tag (what phones write); returns
    the image as viewers show it."""
    upright = PIL.Image.new("RGB", (20, 60), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 20, 20))  # a white square at the top
    stored = upright.transpose(PIL.Image.Transpose.ROTATE_90)  # orientation 6 undoes a 270 (= -90) turn
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.save(path, format="JPEG", exif=exif, quality=95)
    return upright


def test_exif_orientation_is_applied_wherever_an_image_is_decoded(tmp_path, digits_example):
    path = tmp_path / "phone.jpg"
    upright = _exif_jpeg(path, 6)
    assert PIL.Image.open(path).size == (60, 20)  # the pixels as stored: a horizontal bar
    loaded = open_image(str(path))  # what the check, training and evaluation read
    assert loaded.size == (20, 60)
    top = T.functional.pil_to_tensor(loaded.convert("L").crop((0, 0, 20, 20))).float().mean()
    assert top > 200  # the white square is at the top, as every viewer shows it
    served = InferenceModel.load(digits_example)  # serving decodes the bytes: the same orientation
    expected = served.transform(upright.convert("L"))
    got = served.image_input(path.read_bytes())
    assert (got - expected).abs().mean() < 0.05  # JPEG's loss only


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (1-bit) with one compressed row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data",
    [
        _png_header(65535, 65535),  # 4.3 G pixels in 141 bytes: Pillow refuses to open it (DecompressionBombError)
        _png_header(30000, 30000),  # 900 M pixels: beyond Pillow's limit too
        _png_header(5000, 5000),  # 25 M: under Pillow's, over ours
        # a 65535 x 65535 JPEG header
        b"\xff\xd8\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01\xff\xd9",
    ],
    ids=["png-65535", "png-30000", "png-5000", "jpeg-65535"],
)
def test_a_decompression_bomb_is_an_input_error_before_any_pixel_is_decoded(digits_example, data):
    served = InferenceModel.load(digits_example)
    with pytest.raises(InputError) as info:
        served.image_input(data)
    assert info.value.field == "image" and ("too large" in info.value.message or "at most" in info.value.message)
