"""Model architectures, looked up by name (see :mod:`dg2pf_core.models.registry`)."""

# Imported for their registrations.
from dg2pf_core.models import cifar, digits  # noqa: F401
from dg2pf_core.models.registry import (
    ArchSpec,
    build_model,
    get_arch,
    list_archs,
    register_arch,
)

__all__ = ["ArchSpec", "build_model", "get_arch", "list_archs", "register_arch"]
