"""/archs: the architecture names a job's ``arch`` may give on this service."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .auth import require_token
from .schemas import ArchList

router = APIRouter(tags=["archs"], dependencies=[Depends(require_token)])


@router.get("/archs", response_model=ArchList)
def archs() -> ArchList:
    from dg2pf_core.models.hf import transformers_version  # noqa: PLC0415
    from dg2pf_core.models.registry import installed_archs, list_archs, timm_version  # noqa: PLC0415

    return ArchList(
        archs=list_archs(), installed=installed_archs(), timm=timm_version(), transformers=transformers_version()
    )
