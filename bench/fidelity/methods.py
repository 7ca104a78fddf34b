"""Every method of the fidelity grid, by name: importing this module registers them all.

What a method is, and ``register_method``, live in ``registry``; the method modules below import that
module, never this one.
"""

from __future__ import annotations

# Imported for their registrations, in the order the report lists them (channel uses dg2pf_family's and
# torch_prune's pieces, so those come first anyway).
from . import dg2pf_family, gmp, torch_prune, inc, channel, latency  # noqa: F401  isort: skip
from .registry import METHODS, Method


def method_names(*, grid_only: bool = True, kind: str = "sparsity") -> list[str]:
    """The methods of the default grid of ``kind`` (registry order); with ``grid_only=False`` also the
    investigation variants."""
    return [name for name, m in METHODS.items() if m.kind == kind and (m.in_grid or not grid_only)]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose from {list(METHODS)}")
    return METHODS[name]
