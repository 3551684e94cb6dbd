"""Job events: SSE framing, the event vocabulary, and resuming after Last-Event-ID."""

from __future__ import annotations

import json

import pytest

from tokenbroker.core.clock import ManualClock
from tokenbroker.jobs.events import (
    Canceled,
    Completed,
    EventLog,
    Failed,
    Heartbeat,
    ItemFailed,
    JobEvent,
    PhaseUpdate,
    parse_last_event_id,
    sse_frame,
)
from tokenbroker.jobs.model import ItemCounts, JobError, JobStatus


def _parse(stream: str) -> list[dict[str, str]]:
    """A minimal SSE parser per the WHATWG algorithm: fields per line, blank line dispatches,
    data lines joined with LF."""
    events, current, data = [], {}, []
    for line in stream.split("\n"):
        if line == "":
            if current or data:
                events.append({**current, "data": "\n".join(data)})
            current, data = {}, []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            current[name] = value
    return events


def _log(clock: ManualClock, n: int) -> EventLog:
    log = EventLog("job_1")
    for i in range(n):
        log.append(
            PhaseUpdate(
                job_id="job_1", phase="fetch", progress=i, items=ItemCounts(n, i), ts=clock.time()
            )
        )
    return log


def test_a_newline_in_data_stays_one_event() -> None:
    """Data with LF, CR and CRLF is framed as several data lines of one event, read back whole."""
    frame = sse_frame("note", "one\ntwo\r\nthree\rfour", 7)
    assert frame.endswith("\n\n") and frame.count("\n\n") == 1
    [event] = _parse(frame)
    assert event == {"id": "7", "event": "note", "data": "one\ntwo\nthree\nfour"}
    for bad in ("a\nb", "a\rb", "", "a\0b"):
        with pytest.raises(ValueError):
            sse_frame(bad, "{}")
    with pytest.raises(ValueError):
        sse_frame("note", "{}", -1)


def test_an_item_reason_with_newlines_is_one_json_data_line() -> None:
    """A failure reason holding CR/LF is escaped by JSON: one event, one data line, same text."""
    event = EventLog("job_1").append(
        ItemFailed(job_id="job_1", item="alice", reason="line 1\r\nline 2\n\n", retryable=True)
    )
    frame = event.to_sse()
    assert frame.count("\ndata: ") == 1 and frame.count("\n\n") == 1
    [parsed] = _parse(frame)
    assert parsed["id"] == "1" and parsed["event"] == "item_failed"
    assert json.loads(parsed["data"]) == {
        "job_id": "job_1", "item": "alice", "reason": "line 1\r\nline 2\n\n", "retryable": True,
    }  # fmt: skip


def test_every_event_renders_its_documented_payload() -> None:
    """Each event's name and JSON data match the issue's vocabulary."""
    clock = ManualClock(start=1_700_000_000.0)
    ts = "2023-11-14T22:13:20.000Z"
    events: list[tuple[JobEvent, str, dict[str, object]]] = [
        (
            PhaseUpdate(job_id="j", phase="fetch", progress=12.345, items=ItemCounts(4, 1, 1), ts=clock.time()),
            "phase_update",
            {"job_id": "j", "phase": "fetch", "progress": 12.35, "items": {"total": 4, "ok": 1, "failed": 1}, "ts": ts},
        ),
        (Heartbeat(job_id="j", status=JobStatus.RUNNING, ts=clock.time()), "heartbeat", {"job_id": "j", "status": "running", "ts": ts}),
        (Completed(job_id="j", status=JobStatus.PARTIAL), "completed", {"job_id": "j", "status": "partial", "progress": 100}),
        (
            Failed(job_id="j", error=JobError("worker_lost", "gone")),
            "error",
            {"job_id": "j", "status": "failed", "error": {"type": "worker_lost", "message": "gone"}},
        ),
        (Canceled(job_id="j", ts=clock.time()), "canceled", {"job_id": "j", "status": "canceled", "ts": ts}),
    ]  # fmt: skip
    for event, name, data in events:
        [parsed] = _parse(event.to_sse())
        assert (parsed["event"], json.loads(parsed["data"])) == (name, data)
    assert [e.final for e, _, _ in events] == [False, False, True, True, True]
    with pytest.raises(ValueError):
        Completed(job_id="j", status=JobStatus.FAILED)


def test_resume_after_an_id_returns_exactly_the_missing_events() -> None:
    """For every Last-Event-ID 0..n the log returns events id+1..n, in order, nothing else."""
    log = _log(ManualClock(), 20)
    assert [e.seq for e in log.after(0)] == list(range(1, 21))
    for last in range(21):
        assert [e.seq for e in log.after(last)] == list(range(last + 1, 21))
    assert log.after(999) == ()
    assert log.after(parse_last_event_id("  12 ")) == log.after(12)
    assert parse_last_event_id(None) == parse_last_event_id("") == 0
    for bad in ("-1", "abc", "1.5", "١٢", "9" * 30):
        with pytest.raises(ValueError):
            parse_last_event_id(bad)


def test_the_sequence_is_gapless_and_ends_with_the_final_event() -> None:
    """append numbers 1, 2, 3, …; nothing follows a final event; a finished stream is delivered
    only to a client holding the final id (the 204 case)."""
    clock = ManualClock()
    log = _log(clock, 3)
    assert not log.finished and not log.delivered(3)
    final = log.append(Completed(job_id="job_1", status=JobStatus.DONE, seq=99))
    assert final.seq == 4 and log.finished
    assert log.delivered(4) and not log.delivered(3)
    with pytest.raises(ValueError, match="ended"):
        log.append(Canceled(job_id="job_1", ts=clock.time()))
    with pytest.raises(ValueError, match="another job"):
        EventLog("job_2").append(Canceled(job_id="job_1", ts=0.0))
    rebuilt = EventLog("job_1", log.after(0))
    assert rebuilt.last_id == 4 and rebuilt.finished
    with pytest.raises(ValueError, match="out of sequence"):
        EventLog("job_1", log.after(1))


def test_heartbeats_repeat_the_last_id_and_are_not_stored() -> None:
    """A heartbeat carries the newest stored id, so a reconnect after it misses nothing."""
    clock = ManualClock()
    log = _log(clock, 2)
    beat = log.heartbeat(JobStatus.RUNNING, clock.time())
    assert beat.seq == 2 and _parse(beat.to_sse())[0]["id"] == "2"
    assert len(log) == 2
    with pytest.raises(ValueError, match="heartbeats"):
        log.append(beat)
