"""GET /jobs/{id}/events without a service: which events a client that has seen a cursor is missing.

The stream end to end (live records, resume with Last-Event-ID, the refusals) is test_full_lifecycle in
tests/e2e/service/test_api.py; the client's reconnection is in tests/dg2pf_client/test_light_client.py."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from dg2pf_service.api.errors import ApiError
from dg2pf_service.api.events import Cursor, events_since


def job(state: str, phase: str, records: int):
    history = [{"epoch": i, "phase": phase, "sparsity": 0.1 * i, "val_top1": 90.0 + i} for i in range(records)]
    return SimpleNamespace(
        id="a" * 32,
        name=None,
        state=state,
        phase=phase,
        epoch=max(records - 1, 0),
        restarts=0,
        restart_log=[],
        current_sparsity=0.0,
        target_sparsity=0.9,
        latest_metrics=None,
        best_metrics=None,
        history=history,
        error_type=None,
        error_message=None,
        created_at=datetime.now(UTC),
        started_at=None,
        finished_at=None,
        eta_seconds=None,
        spec={"spec": {}},
    )


def test_a_new_client_gets_the_state_then_every_record_and_a_cursor_that_says_so():
    events, seen = events_since(job("running", "gradual_pruning", 3), Cursor())
    assert [(e.event, e.id) for e in events] == [
        ("state", "0:running:gradual_pruning"),
        ("epoch", "1:running:gradual_pruning"),
        ("epoch", "2:running:gradual_pruning"),
        ("epoch", "3:running:gradual_pruning"),
    ]
    assert events[0].data.state == "running" and [e.data["epoch"] for e in events[1:]] == [0, 1, 2]
    assert seen == Cursor(3, "running", "gradual_pruning")


def test_nothing_is_sent_twice_and_a_phase_change_is_one_state_event():
    seen = Cursor.parse("2:running:gradual_pruning")
    assert events_since(job("running", "gradual_pruning", 2), seen) == ([], seen)
    events, after = events_since(job("running", "distillation", 4), seen)
    assert [(e.event, e.id) for e in events] == [
        ("state", "2:running:distillation"),
        ("epoch", "3:running:distillation"),
        ("epoch", "4:running:distillation"),
    ]
    assert events[1].data["epoch"] == 2 and after == Cursor(4, "running", "distillation")


def test_the_final_state_is_the_last_event_even_for_a_client_that_comes_after_the_end():
    events, after = events_since(job("succeeded", "done", 2), Cursor())
    assert [(e.event, e.id) for e in events] == [("epoch", "1::"), ("epoch", "2::"), ("state", "2:succeeded:done")]
    assert after == Cursor(2, "succeeded", "done")
    assert Cursor.parse("1::") == Cursor(1)  # a client cut off before the final state resumes from there
    events, _ = events_since(job("succeeded", "done", 2), Cursor.parse("1::"))
    assert [(e.event, e.id) for e in events] == [("epoch", "2::"), ("state", "2:succeeded:done")]


def test_a_history_rewritten_shorter_by_a_restart_sends_no_record_again():
    events, after = events_since(job("running", "gradual_pruning", 2), Cursor(5, "running", "gradual_pruning"))
    assert events == [] and after.records == 5


@pytest.mark.parametrize(
    "bad",
    [
        "x",
        "1:running",
        "1:running:sleeping",
        "1:asleep:baseline",
        "-1:running:baseline",
        "1234567890:running:baseline",
        "1:running:baseline\n2:running:baseline",
        "1:running:",
        "1::done",
    ],
)
def test_a_last_event_id_this_stream_did_not_send_is_refused_naming_the_header(bad):
    with pytest.raises(ApiError) as info:
        Cursor.parse(bad)
    assert info.value.status_code == 422 and info.value.detail["error"]["field"] == "Last-Event-ID"


def test_no_last_event_id_starts_from_the_beginning():
    assert Cursor.parse(None) == Cursor.parse("") == Cursor()
