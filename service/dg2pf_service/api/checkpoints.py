"""POST /checkpoints: a weights file, or a zipped Hugging Face model directory, streamed to a staging
folder, checked, then put in the store.

The body is read here as it arrives (``uploads.CheckpointUploads``), not parsed up front by FastAPI,
so size and time limits hold while it is received; the file is checked off the event loop.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from starlette.requests import ClientDisconnect

from dg2pf_core.errors import CheckpointError

from ..model_dirs import store_from_archive
from ..uploads import FIELD, CheckpointUploads, UploadRefused
from .auth import require_token
from .errors import ApiError
from .schemas import CheckpointOut

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"], dependencies=[Depends(require_token)])
_SUFFIX = {"safetensors": ".safetensors", "torch": ".pt"}


def _intake(app: FastAPI) -> CheckpointUploads:
    # One per app: its validation slots are shared by every upload the app receives.
    intake = getattr(app.state, "checkpoint_uploads", None)
    if intake is None:
        intake = app.state.checkpoint_uploads = CheckpointUploads(app.state.services.settings)
    return intake


@router.post(
    "",
    status_code=201,
    response_model=CheckpointOut,
    responses={
        200: {"model": CheckpointOut, "description": "the same content was uploaded before: the same id"},
        **ApiError.responses(400, 408, 413, 422, 507),
    },
)
async def upload(request: Request, response: Response) -> CheckpointOut:
    services = request.app.state.services
    intake = _intake(request.app)
    try:
        async with intake.receive(request.stream(), request.headers) as staged:
            kind = await intake.check(staged)
            if kind == "hf":  # a zipped model directory: its files stored as one directory (model_dirs)
                try:
                    row, new = await anyio.to_thread.run_sync(
                        store_from_archive,
                        staged.path,
                        staged.filename,
                        services.settings,
                        services.store,
                        limiter=intake.slots,
                    )
                except CheckpointError as exc:
                    message = exc.message.replace(str(staged.path), staged.filename)
                    raise UploadRefused(422, "invalid_checkpoint", message) from None
                if not new:
                    response.status_code = 200
                return CheckpointOut(id=row.id, sha256=row.sha256, bytes=row.bytes)
            checkpoint_id = staged.sha256[:32]
            if services.store.get_checkpoint(checkpoint_id) is None:
                final = services.settings.checkpoints_dir / f"{checkpoint_id}{_SUFFIX[kind]}"
                intake.publish(staged, final)
                services.store.add_checkpoint(staged.sha256, staged.size, str(final), kind)
            else:
                response.status_code = 200  # same content as before: same id
            return CheckpointOut(id=checkpoint_id, sha256=staged.sha256, bytes=staged.size)
    except UploadRefused as exc:
        # Closing the connection with the answer keeps the server from reading the rest of the body.
        headers = {"Connection": "close"} if exc.body_unread else None
        raise ApiError(exc.status, exc.type, exc.message, exc.field, headers=headers) from exc
    except ClientDisconnect:
        raise ApiError(
            400, "client_disconnected", "the client closed the connection before the upload was complete", FIELD
        ) from None


# FastAPI documents a body only from parameters it parses itself; this one is read by hand.
_route = next(r for r in router.routes if getattr(r, "endpoint", None) is upload)
_route.openapi_extra = {
    **(_route.openapi_extra or {}),
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {
                        FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "the weights: a .safetensors file or a torch.save state_dict "
                            "(at most DG2PF_MAX_UPLOAD_BYTES)",
                        }
                    },
                }
            }
        },
    },
}
