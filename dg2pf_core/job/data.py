"""The job's data: the dataset spec loaded into train / validation / test splits at the image size and
channels the architecture takes, its classes matching the model's."""

from __future__ import annotations

from dg2pf_contract.job import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from dg2pf_core.data import DataRequest, DataSplits, load_dataset
from dg2pf_core.errors import ConfigError, DatasetError
from dg2pf_core.models import ArchSpec


def load_data(
    dataset: str,
    arch: ArchSpec,
    num_classes: int,
    image_size: int | None,
    val_fraction: float,
    seed: int,
    skip_bad_images: bool = False,
    allowed_roots: tuple[str, ...] = (),
    augment: str | None = None,
    crop_pct: float | None = None,
) -> tuple[DataSplits, int]:
    size = arch.input_size if image_size is None else image_size
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, got {size}", field="image_size"
        )
    splits = load_dataset(
        dataset,
        DataRequest(
            image_size=size,
            in_channels=arch.in_channels,
            val_fraction=val_fraction,
            seed=seed,
            skip_bad_images=skip_bad_images,
            allowed_roots=tuple(allowed_roots),
            augment=augment,
            crop_pct=crop_pct if crop_pct is not None else arch.crop_pct,
            mean=arch.mean,
            std=arch.std,
            interpolation=arch.interpolation,
        ),
    )
    if splits.num_classes != num_classes:
        raise DatasetError(
            f"dataset {dataset!r} has {splits.num_classes} classes but the model was given num_classes={num_classes}; "
            "they must match",
            field="num_classes",
        )
    return splits, size
