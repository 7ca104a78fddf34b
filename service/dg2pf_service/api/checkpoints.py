"""POST /checkpoints: a weights file, streamed to disk, checked to be loadable without unpickling."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response, UploadFile

from dg2pf_core.checkpoints import read_state_dict
from dg2pf_core.errors import CheckpointError

from .auth import require_token
from .errors import ApiError
from .schemas import CheckpointOut

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"], dependencies=[Depends(require_token)])
CHUNK = 1 << 20


def _sniff_suffix(head: bytes) -> str:
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return ".safetensors" if len(head) > 8 and head[8:9] == b"{" else ".pt"


@router.post("", status_code=201, response_model=CheckpointOut)
async def upload(request: Request, file: UploadFile, response: Response) -> CheckpointOut:
    services = request.app.state.services
    limit = services.settings.max_upload_bytes
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit + (1 << 16):  # multipart framing is small; refuse before reading
        raise ApiError(413, "too_large", f"upload of {declared} bytes exceeds the limit of {limit} bytes", "file")
    target_dir = services.settings.checkpoints_dir
    fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=".upload-")
    tmp = Path(tmp_name)
    digest, size, head = hashlib.sha256(), 0, b""
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too_large", f"upload exceeds the limit of {limit} bytes", "file")
                if len(head) < 16:
                    head += chunk[:16]
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise ApiError(422, "invalid_checkpoint", "the uploaded file is empty", "file")
        sha = digest.hexdigest()
        final = target_dir / f"{sha[:32]}{_sniff_suffix(head)}"
        named = tmp.with_suffix(_sniff_suffix(head))
        os.replace(tmp, named)
        tmp = named
        try:
            read_state_dict(tmp)
        except CheckpointError as exc:
            raise ApiError(422, "invalid_checkpoint", exc.message.replace(str(tmp), file.filename or "upload"), "file") from exc
        existing = services.store.get_checkpoint(sha[:32])
        if existing is None:
            os.replace(tmp, final)
            services.store.add_checkpoint(sha, size, str(final), "safetensors" if final.suffix == ".safetensors" else "torch")
        else:
            response.status_code = 200  # same content as before: same id
        return CheckpointOut(id=sha[:32], sha256=sha, bytes=size)
    finally:
        if tmp.exists():
            tmp.unlink()
