"""The job record: states and legal moves, ids, canonical params, the JSON rendering."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from tokenbroker.core.clock import ManualClock
from tokenbroker.jobs.model import (
    JOB_ID_BYTES,
    TRANSITIONS,
    FailedItem,
    ItemCounts,
    Job,
    JobError,
    JobStatus,
    JobTransitionError,
    canonical_params,
    check_transition,
    idempotency_key,
    iso8601,
    new_job_id,
)

LEGAL = {
    ("queued", "running"),
    ("queued", "canceled"),
    ("queued", "failed"),
    ("running", "done"),
    ("running", "partial"),
    ("running", "failed"),
    ("running", "canceling"),
    ("running", "queued"),
    ("canceling", "canceled"),
    ("canceling", "done"),
    ("canceling", "partial"),
    ("canceling", "failed"),
}


def _job(clock: ManualClock) -> Job:
    return Job(
        job_id=new_job_id(),
        kind="warm",
        params={"provider": "tdx"},
        requested_by="ops",
        created_at=clock.time(),
    )


@pytest.mark.parametrize("current", list(JobStatus))
@pytest.mark.parametrize("wanted", list(JobStatus))
def test_only_the_drawn_transitions_are_legal(current: JobStatus, wanted: JobStatus) -> None:
    """Every pair of statuses outside the diagram is refused with a message naming both."""
    if (current.value, wanted.value) in LEGAL:
        check_transition(current, wanted)
        return
    with pytest.raises(JobTransitionError) as caught:
        check_transition(current, wanted)
    assert f"a {current.value} job cannot become {wanted.value}" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_final_statuses_have_no_way_out() -> None:
    """done, partial, failed and canceled are final; the others are not."""
    assert {s.value for s in JobStatus if s.final} == {"done", "partial", "failed", "canceled"}
    assert all(not TRANSITIONS[s] for s in JobStatus if s.final)


def test_moving_a_job_stamps_its_times_and_refuses_illegal_moves() -> None:
    """started_at is set on the first run, finished_at on a final status, updated_at always;
    a finished job cannot run again."""
    clock = ManualClock()
    queued = _job(clock)
    assert queued.updated_at == queued.created_at
    clock.advance(2)
    running = queued.moved_to(JobStatus.RUNNING, at=clock.time(), owner="host-1")
    assert (running.started_at, running.owner, running.finished_at) == (
        clock.time(),
        "host-1",
        None,
    )
    clock.advance(3)
    requeued = running.moved_to(JobStatus.QUEUED, at=clock.time(), owner=None)
    again = requeued.moved_to(JobStatus.RUNNING, at=clock.time() + 1)
    assert again.started_at == running.started_at
    done = again.moved_to(JobStatus.DONE, at=clock.time() + 5, progress=100.0)
    assert done.finished_at == done.updated_at == clock.time() + 5
    assert queued.status is JobStatus.QUEUED  # records are values
    with pytest.raises(JobTransitionError):
        done.moved_to(JobStatus.RUNNING, at=clock.time())


def test_job_ids_are_unique_and_carry_128_random_bits() -> None:
    """10,000 ids are distinct, URL-safe, and decode to 16 random bytes."""
    ids = {new_job_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for job_id in list(ids)[:100]:
        body = job_id.removeprefix("job_")
        assert job_id.startswith("job_") and body.replace("-", "").replace("_", "").isalnum()
        assert len(base64.urlsafe_b64decode(body + "==")) == JOB_ID_BYTES >= 16


def test_canonical_params_ignore_key_order_and_refuse_non_json() -> None:
    """Equal params give one text and one idempotency key; other kinds or values do not."""
    a = {"provider": "tdx", "scopes": ["b", "a"], "opts": {"y": 1, "x": None}}
    b = {"opts": {"x": None, "y": 1}, "scopes": ["b", "a"], "provider": "tdx"}
    assert canonical_params(a) == canonical_params(b)
    assert canonical_params(a) == '{"opts":{"x":null,"y":1},"provider":"tdx","scopes":["b","a"]}'
    assert idempotency_key("warm", a) == idempotency_key("warm", b)
    assert idempotency_key("warm", a).startswith("warm:")
    assert idempotency_key("refresh", a) != idempotency_key("warm", a)
    assert idempotency_key("warm", {**a, "provider": "x"}) != idempotency_key("warm", a)
    for bad in ({"n": float("nan")}, {"s": {1, 2}}, {"b": b"x"}):
        with pytest.raises(ValueError, match="JSON"):
            canonical_params(bad)


def test_a_job_holds_a_copy_of_its_params_read_only() -> None:
    """Changing the caller's dict afterwards does not change the job; the job's params are
    read-only; malformed kinds and progress are refused."""
    params = {"provider": "tdx"}
    job = Job(job_id="j", kind="warm", params=params, requested_by="ops", created_at=0.0)
    params["provider"] = "other"
    assert job.params == {"provider": "tdx"}
    with pytest.raises(TypeError):
        job.params["provider"] = "x"  # type: ignore[index]
    with pytest.raises(ValueError, match="kind"):
        Job(job_id="j", kind="Warm Up", params={}, requested_by="ops", created_at=0.0)
    with pytest.raises(ValueError, match="progress"):
        Job(job_id="j", kind="warm", params={}, requested_by="ops", created_at=0.0, progress=101)
    with pytest.raises(ValueError, match="item counts"):
        ItemCounts(total=2, ok=2, failed=1)


def test_to_dict_renders_every_field_with_utc_iso_times() -> None:
    """The rendering has exactly the issue's fields, JSON-serialisable, times as ...Z."""
    clock = ManualClock(start=1_700_000_000.25)
    job = _job(clock).moved_to(
        JobStatus.RUNNING, at=clock.time() + 1, owner="host-1", heartbeat_at=clock.time() + 1
    )
    job = dataclasses.replace(
        job,
        phase="fetch",
        progress=42.123,
        items=ItemCounts(total=3, ok=1, failed=1),
        failed=(FailedItem("alice", "provider_unavailable: 503", True),),
        error=JobError("worker_lost", "the worker stopped"),
        metrics={"fetch_seconds": 1.5},
    )
    rendered = job.to_dict()
    assert set(rendered) == {
        "job_id", "kind", "params", "status", "phase", "progress", "created_at", "started_at",
        "updated_at", "finished_at", "owner", "heartbeat_at", "items", "failed", "error",
        "metrics", "requested_by",
    }  # fmt: skip
    assert json.loads(json.dumps(rendered)) == rendered
    assert rendered["created_at"] == "2023-11-14T22:13:20.250Z"
    assert rendered["started_at"] == "2023-11-14T22:13:21.250Z"
    assert rendered["finished_at"] is None
    assert rendered["progress"] == 42.12
    assert rendered["items"] == {"total": 3, "ok": 1, "failed": 1}
    assert rendered["failed"] == [
        {"item": "alice", "reason": "provider_unavailable: 503", "retryable": True}
    ]
    assert rendered["error"] == {"type": "worker_lost", "message": "the worker stopped"}
    assert (rendered["status"], rendered["requested_by"]) == ("running", "ops")
    assert iso8601(None) is None
