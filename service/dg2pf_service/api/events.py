"""GET /jobs/{id}/events: a job's progress as server-sent events, live and resumable.

The stream carries two kinds of event:

- ``state``: the job as ``GET /jobs/{id}`` shows it (``JobOut``), sent on connecting and whenever its
  state or phase changes; the one that reports a final state (succeeded, failed, cancelled) is the
  stream's last event;
- ``epoch``: one per epoch record the run writes (epoch, phase, sparsity, train_loss, val_top1, ...),
  in order, each exactly once.

Every event's ``id`` is the position after it: ``<records sent>:<state>:<phase>``. A client that lost
the connection sends the last id it saw as ``Last-Event-ID`` (browsers' EventSource do so by
themselves) and receives what it missed and nothing twice. The service reads the job from its store
every ``POLL_S`` seconds, so any API replica can serve any stream; FastAPI adds a keep-alive comment
every 15 s of silence, so proxies do not cut a long phase.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from .auth import require_token
from .errors import ApiError
from .jobs import JobId, _row_or_404, _services, job_out
from .schemas import TERMINAL, Phase, State

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_token)])

POLL_S = 0.5
RETRY_MS = 2000  # how long a browser's EventSource waits before it reconnects
_STATES = State.__args__  # type: ignore[attr-defined]
_PHASES = Phase.__args__  # type: ignore[attr-defined]
_CURSOR = re.compile(r"(\d{1,9}):([a-z]*):([a-z_]*)")  # "<n>::" before any state was sent


@dataclass(frozen=True)
class Cursor:
    """What a client has seen: how many epoch records, and the last state and phase."""

    records: int = 0
    state: str = ""
    phase: str = ""

    def __str__(self) -> str:
        return f"{self.records}:{self.state}:{self.phase}"

    @classmethod
    def parse(cls, value: str | None) -> Cursor:
        if value is None or not value.strip():
            return cls()
        m = _CURSOR.fullmatch(value.strip())
        if m is None or (m[2], m[3]) != ("", "") and (m[2] not in _STATES or m[3] not in _PHASES):
            raise ApiError(
                422,
                "invalid_field",
                f"Last-Event-ID {value[:80]!r} is not an id this stream sent "
                "(<records>:<state>:<phase>, e.g. 3:running:gradual_pruning); leave it out to start "
                "from the beginning",
                "Last-Event-ID",
            )
        return cls(int(m[1]), m[2], m[3])


def events_since(row: Any, seen: Cursor) -> tuple[list[ServerSentEvent], Cursor]:
    """The events a client that has seen ``seen`` is missing from ``row``, and the cursor after them.

    A state change comes before the records (a client shows "running" before that phase's epochs),
    except the final one, which is always the stream's last event: a client may stop reading there.
    A restarted run may rewrite its history shorter: records already counted are not sent again.
    """
    out: list[ServerSentEvent] = []

    def state_event() -> None:
        nonlocal seen
        seen = replace(seen, state=row.state, phase=row.phase)
        out.append(ServerSentEvent(event="state", id=str(seen), data=job_out(row)))

    changed, final = (row.state, row.phase) != (seen.state, seen.phase), row.state in TERMINAL
    if changed and not final:
        state_event()
    for i, record in enumerate((row.history or [])[seen.records :], start=seen.records + 1):
        seen = replace(seen, records=i)
        out.append(ServerSentEvent(event="epoch", id=str(seen), data=record))
    if changed and final:
        state_event()
    return out, seen


def _start(
    job_id: JobId,
    services=Depends(_services),
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="the last event id received, to resume")
    ] = None,
) -> tuple[Any, Cursor]:
    # A dependency, so an unknown job or a bad Last-Event-ID is an error response, not a broken stream.
    cursor = Cursor.parse(last_event_id)
    return _row_or_404(services, job_id), cursor


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "text/event-stream: `state` events (data: the job, as GET /jobs/{id}) and "
            "`epoch` events (data: one epoch record); ends after the final state"
        },
        **ApiError.responses(404, 422),
    },
)
async def events(
    request: Request, start: tuple[Any, Cursor] = Depends(_start), services=Depends(_services)
) -> AsyncIterator[ServerSentEvent]:
    row, seen = start
    first = True
    while True:
        batch, seen = events_since(row, seen)
        for event in batch:
            if first:
                event.retry, first = RETRY_MS, False
            yield event
        if row.state in TERMINAL or await request.is_disconnected() or request.app.state.stopping.is_set():
            return  # a shutdown ends the stream: the client resumes with its last id
        await asyncio.sleep(POLL_S)
        row = await run_in_threadpool(services.store.get_job, row.id)
        if row is None:  # not something the API does; a store emptied by hand
            return
