"""How a :class:`~tokenbroker.jobs.model.Job` is kept in the store, and read back.

The store row holds what the store must reason about (status, owner, fence, lease,
heartbeat, idempotency key); the rest is the row's JSON *document*: params, phase, progress,
times, item counts, failures, error, metrics, and the runner's resume state (every item,
the items finished). :class:`StoredEvent` is a stored event as readers get it: its
sequence, name and JSON payload, rendered to an SSE message with
:func:`~tokenbroker.jobs.events.sse_frame`. Nothing secret goes in: params name providers,
items name accounts, providers and store rows; failure reasons are tokenbroker's
secret-free messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..store import JobEventRow, JobRow
from .events import JobEvent, sse_frame
from .model import FailedItem, ItemCounts, Job, JobError, JobStatus

__all__ = ["Progress", "StoredEvent", "encode", "event_data", "job_of", "progress_of"]


@dataclass
class Progress:
    """A job's resume state: every item (None until resolved) and those that ended.

    Attributes:
        items: Every item, once the resolve phase listed them.
        ok: Items that succeeded.
        attempts: Attempts made per item (for metrics and tests).
    """

    items: list[str] | None = None
    ok: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)


def encode(job: Job, progress: Progress) -> str:
    """The document of ``job`` with its resume state, as JSON text."""
    return json.dumps(
        {
            "params": dict(job.params),
            "phase": job.phase,
            "progress": job.progress,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "updated_at": job.updated_at,
            "finished_at": job.finished_at,
            "items": asdict(job.items),
            "failed": [asdict(f) for f in job.failed],
            "error": None if job.error is None else asdict(job.error),
            "metrics": dict(job.metrics),
            "resume": {
                "items": progress.items,
                "ok": progress.ok,
                "attempts": progress.attempts,
            },
        },
        separators=(",", ":"),
        allow_nan=False,
    )


def job_of(row: JobRow) -> Job:
    """The job a stored row holds (status, owner and heartbeat from the row)."""
    doc = json.loads(row.document)
    error = doc.get("error")
    return Job(
        job_id=row.id,
        kind=row.kind,
        params=doc.get("params", {}),
        requested_by=row.requested_by,
        created_at=doc.get("created_at", row.created_at),
        status=JobStatus(row.status),
        phase=doc.get("phase"),
        progress=doc.get("progress", 0.0),
        started_at=doc.get("started_at"),
        updated_at=doc.get("updated_at"),
        finished_at=doc.get("finished_at"),
        owner=row.owner,
        heartbeat_at=row.heartbeat_at,
        items=ItemCounts(**doc.get("items", {})),
        failed=tuple(FailedItem(**f) for f in doc.get("failed", [])),
        error=None if error is None else JobError(**error),
        metrics=doc.get("metrics", {}),
    )


def progress_of(row: JobRow) -> Progress:
    """The resume state kept in a stored row."""
    resume = json.loads(row.document).get("resume", {})
    return Progress(
        items=resume.get("items"),
        ok=list(resume.get("ok", [])),
        attempts=dict(resume.get("attempts", {})),
    )


def event_data(event: JobEvent) -> tuple[str, str]:
    """``(name, JSON payload)`` of an event record, as the store keeps it."""
    return event.name, json.dumps(event.data(), separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One stored job event, as readers (the SSE stream, the CLI) get it.

    Attributes:
        job_id: The job.
        seq: Its sequence number (the SSE ``id:``).
        name: The SSE ``event:`` name.
        data: The JSON payload, decoded.
    """

    job_id: str
    seq: int
    name: str
    data: Mapping[str, Any]

    @property
    def final(self) -> bool:
        """Whether this event ends the job's stream."""
        return self.name in ("completed", "error", "canceled")

    def to_sse(self) -> str:
        """The event as one SSE message with ``id: seq``."""
        return sse_frame(self.name, json.dumps(dict(self.data), separators=(",", ":")), self.seq)

    @classmethod
    def from_row(cls, row: JobEventRow) -> StoredEvent:
        """The event a stored row holds."""
        return cls(row.job_id, row.seq, row.name, json.loads(row.data))
