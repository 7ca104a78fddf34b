"""Datasets by name. ``load_dataset("cifar10:/data/c10", DataRequest(32, 3))`` -> ``DataSplits``.

Importing this package registers every bundled loader; see ``dataset_usages()`` for the specs.
"""

from dg2pf_core.data.registry import (
    AUGMENT_POLICIES,
    DataSplits,
    augment_for,
    dataset_names,
    dataset_usages,
    eval_transform_for,
    load_dataset,
    parse_spec,
    register_dataset,
)
from dg2pf_core.data.request import DataRequest

# Imported for their @register_dataset side effect.
from dg2pf_core.data import cifar10, digits, idx, imagefolder  # noqa: E402,F401  isort: skip

__all__ = [
    "AUGMENT_POLICIES",
    "DataRequest",
    "DataSplits",
    "augment_for",
    "dataset_names",
    "dataset_usages",
    "eval_transform_for",
    "load_dataset",
    "parse_spec",
    "register_dataset",
]
