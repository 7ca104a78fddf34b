"""What the model needs from the data: the registry, the loaders and their transforms all read it."""

from __future__ import annotations

from dataclasses import dataclass

# An architecture's own normalisation (or a metrics.json's): |mean| and std within these, std above the low end
# (a float32 image divided by 1e-320 is all infinities; one normalised by 1e308 means the same).
MEAN_LIMIT = 1e4
STD_RANGE = (1e-4, 1e4)
FILTERS = ("bilinear", "bicubic", "nearest")  # the resize filters preprocessing takes


def normalisation_problems(mean: object, std: object, interpolation: object, in_channels: int) -> list[tuple[str, str]]:
    """(field, why) for each unusable normalisation value: an architecture's own or a metrics.json's."""
    import math  # noqa: PLC0415

    def number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    out = []
    for name, values, (low, high) in (("mean", mean, (-MEAN_LIMIT, MEAN_LIMIT)), ("std", std, STD_RANGE)):
        if values is not None and (
            not isinstance(values, (tuple, list))
            or len(values) not in (in_channels, 3)
            or not all(number(v) and low <= v <= high for v in values)
        ):
            count = "3" if in_channels == 3 else "1 or 3"
            out.append((name, f"{name} must be {count} numbers in [{low:g}, {high:g}], got {values!r}"))
    if interpolation is not None and interpolation not in FILTERS:
        out.append(("interpolation", f"interpolation must be one of {list(FILTERS)}, got {interpolation!r}"))
    return out


@dataclass(frozen=True)
class DataRequest:
    """What the model needs from the data; the loader adapts its images to it."""

    image_size: int  # square input size the model wants
    in_channels: int  # 1 or 3
    val_fraction: float = 0.1  # held out from train when the dataset has no validation split
    seed: int = 0  # seeds the validation hold-out only
    # Folder datasets: leave out images that cannot be decoded (listed in
    # DataSplits.skipped_images) instead of refusing the dataset.
    skip_bad_images: bool = False
    # Folders every file must stay inside (a service's DG2PF_DATA_ROOTS, see roots.py); () = anywhere.
    allowed_roots: tuple[str, ...] = ()
    # Training augmentation, one of dg2pf_contract.job.AUGMENT_POLICIES; None or "auto": the dataset's default for this
    # image size. Only the training view changes: validation, test and serving preprocess alike.
    augment: str | None = None
    # Folder datasets' evaluation: the fraction of a larger image's short side its centre crop keeps
    # (transforms.FitAndCrop; None: ImageNet's 0.875). Images at or below the target size are never cut.
    crop_pct: float | None = None
    # Folder datasets' normalisation and resize filter (the architecture's own, e.g. a timm model's
    # pretrained_cfg; None: ImageNet's mean and std, bilinear).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None  # "bilinear", "bicubic" or "nearest"
