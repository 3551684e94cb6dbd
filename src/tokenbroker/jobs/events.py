"""A job's events as Server-Sent Events, and the log that answers "what came after id N".

Vocabulary (``event:`` name → record):

- ``phase_update`` → :class:`PhaseUpdate` ``{job_id, phase, progress, items, ts}``
- ``item_failed`` → :class:`ItemFailed` ``{job_id, item, reason, retryable}``
- ``heartbeat`` → :class:`Heartbeat` ``{job_id, status, ts}``
- ``completed`` → :class:`Completed` ``{job_id, status: done|partial, progress: 100}``
- ``error`` → :class:`Failed` ``{job_id, status: failed, error}``
- ``canceled`` → :class:`Canceled` ``{job_id, status: canceled, ts}``

Each stored event has ``seq``, the job's event sequence: 1, 2, 3, … with no gaps, sent as
the SSE ``id:`` so a client reconnecting with ``Last-Event-ID: N`` gets exactly the events
after N (:meth:`EventLog.after`). A heartbeat is not stored and does not advance the
sequence: it repeats the last stored event's id, so a reconnect after it misses nothing.
The final event (``completed``, ``error`` or ``canceled``) ends the log.

Framing follows the WHATWG HTML "Server-sent events" section: a field value never holds
CR or LF; data is JSON (which escapes both), and a data text with a line break would be
sent as several ``data:`` lines of one event. Nothing here does I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any, ClassVar

from tokenbroker.jobs.model import ItemCounts, JobError, JobStatus, JsonValue, iso8601

__all__ = [
    "Canceled",
    "Completed",
    "EventLog",
    "Failed",
    "Heartbeat",
    "ItemFailed",
    "JobEvent",
    "PhaseUpdate",
    "event_from",
    "parse_last_event_id",
    "sse_frame",
]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def sse_frame(event: str, data: str, event_id: int | None = None) -> str:
    """One SSE message: ``id:``, ``event:``, one ``data:`` line per line of ``data``, a
    blank line.

    Args:
        event: The event name; no CR, LF or NUL.
        data: The payload; each of its lines becomes a ``data:`` line, so a client sees the
            same text (lines joined with LF) as one event.
        event_id: The ``id:`` value, if any (not negative).

    Raises:
        ValueError: For an event name with a line break or NUL, or a negative id.
    """
    if not event or _LINE_BREAK.search(event) or "\0" in event:
        raise ValueError("an SSE event name must be non-empty without CR, LF or NUL")
    lines = []
    if event_id is not None:
        if event_id < 0:
            raise ValueError("an SSE event id must not be negative")
        lines.append(f"id: {event_id}")
    lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
    return "\n".join(lines) + "\n\n"


def parse_last_event_id(header: str | None) -> int:
    """The sequence number in a ``Last-Event-ID`` header (0 when absent or empty).

    Raises:
        ValueError: For anything but a non-negative decimal integer.
    """
    if header is None or header.strip() == "":
        return 0
    text = header.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ValueError("Last-Event-ID must be a non-negative integer")
    return int(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobEvent:
    """Base of a job's events.

    Attributes:
        job_id: The job.
        seq: Its place in the job's sequence (0 until :meth:`EventLog.append` numbers it).
    """

    #: The SSE ``event:`` name.
    name: ClassVar[str] = ""
    #: True for the event that ends a job's stream.
    final: ClassVar[bool] = False

    job_id: str
    seq: int = 0

    def data(self) -> dict[str, JsonValue]:
        """The event's JSON payload (``job_id`` and the event's own fields)."""
        return {"job_id": self.job_id}

    def to_sse(self) -> str:
        """The event as one SSE message with ``id: seq``."""
        text = json.dumps(self.data(), separators=(",", ":"), allow_nan=False)
        return sse_frame(self.name, text, self.seq)


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseUpdate(JobEvent):
    """The job's phase or progress moved (coalesced; see :mod:`tokenbroker.jobs.progress`)."""

    name: ClassVar[str] = "phase_update"
    phase: str
    progress: float
    items: ItemCounts
    ts: float

    def data(self) -> dict[str, JsonValue]:
        """``{job_id, phase, progress, items, ts}``."""
        return {
            "job_id": self.job_id,
            "phase": self.phase,
            "progress": round(self.progress, 2),
            "items": asdict(self.items),
            "ts": iso8601(self.ts),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemFailed(JobEvent):
    """An item failed for good."""

    name: ClassVar[str] = "item_failed"
    item: str
    reason: str
    retryable: bool

    def data(self) -> dict[str, JsonValue]:
        """``{job_id, item, reason, retryable}``."""
        return {
            "job_id": self.job_id,
            "item": self.item,
            "reason": self.reason,
            "retryable": self.retryable,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(JobEvent):
    """The job is alive (sent every few seconds; never stored; repeats the last id)."""

    name: ClassVar[str] = "heartbeat"
    status: JobStatus
    ts: float

    def data(self) -> dict[str, JsonValue]:
        """``{job_id, status, ts}``."""
        return {"job_id": self.job_id, "status": self.status.value, "ts": iso8601(self.ts)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed(JobEvent):
    """The job ended ``done`` or ``partial``; its progress is 100.

    Raises:
        ValueError: For another status.
    """

    name: ClassVar[str] = "completed"
    final: ClassVar[bool] = True
    status: JobStatus

    def __post_init__(self) -> None:
        if self.status not in {JobStatus.DONE, JobStatus.PARTIAL}:
            raise ValueError(f"a completed job is done or partial, not {self.status.value}")

    def data(self) -> dict[str, JsonValue]:
        """``{job_id, status, progress: 100}``."""
        return {"job_id": self.job_id, "status": self.status.value, "progress": 100}


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed(JobEvent):
    """The job ended ``failed`` (SSE event ``error``)."""

    name: ClassVar[str] = "error"
    final: ClassVar[bool] = True
    error: JobError

    def data(self) -> dict[str, JsonValue]:
        """``{job_id, status: failed, error: {type, message}}``."""
        return {"job_id": self.job_id, "status": "failed", "error": asdict(self.error)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Canceled(JobEvent):
    """The job's work stopped after a cancel request."""

    name: ClassVar[str] = "canceled"
    final: ClassVar[bool] = True
    ts: float

    def data(self) -> dict[str, JsonValue]:
        """``{job_id, status: canceled, ts}``."""
        return {"job_id": self.job_id, "status": "canceled", "ts": iso8601(self.ts)}


class EventLog:
    """One job's stored events in sequence order, numbered 1, 2, 3, … without gaps.

    Args:
        job_id: The job.
        events: Events already stored (e.g. read back from the store), in order.

    Raises:
        ValueError: When ``events`` belong to another job, are not numbered 1..n, hold a
            heartbeat, or go on after a final event.
    """

    __slots__ = ("_events", "job_id")

    def __init__(self, job_id: str, events: Iterable[JobEvent] = ()) -> None:
        self.job_id = job_id
        self._events: list[JobEvent] = []
        for event in events:
            if event.seq != len(self._events) + 1:
                raise ValueError(f"event {event.seq} out of sequence")
            self._check(event)
            self._events.append(event)

    @property
    def last_id(self) -> int:
        """The sequence number of the newest event (0 when there is none)."""
        return len(self._events)

    @property
    def finished(self) -> bool:
        """True once the final event is in the log."""
        return bool(self._events) and self._events[-1].final

    def append(self, event: JobEvent) -> JobEvent:
        """Store the job's next event.

        Args:
            event: The event; its ``seq`` is ignored.

        Returns:
            The event numbered with the next sequence value.

        Raises:
            ValueError: For a heartbeat, another job's event, or any event after the final one.
        """
        self._check(event)
        numbered = replace(event, seq=len(self._events) + 1)
        self._events.append(numbered)
        return numbered

    def heartbeat(self, status: JobStatus, ts: float) -> Heartbeat:
        """A heartbeat carrying the newest stored id (it is not stored itself)."""
        return Heartbeat(job_id=self.job_id, seq=self.last_id, status=status, ts=ts)

    def after(self, last_event_id: int) -> tuple[JobEvent, ...]:
        """Exactly the events a client that has seen up to ``last_event_id`` is missing.

        Args:
            last_event_id: From :func:`parse_last_event_id` (0: the client has none).

        Returns:
            The events with ``seq > last_event_id``, in order; empty when it has them all.
        """
        return tuple(self._events[max(last_event_id, 0) :])

    def delivered(self, last_event_id: int) -> bool:
        """True when the job's stream is over for a client that has seen ``last_event_id``:
        the final event is stored and the client has it (answer 204, so EventSource stops)."""
        return self.finished and last_event_id >= self.last_id

    def _check(self, event: JobEvent) -> None:
        if isinstance(event, Heartbeat):
            raise ValueError("heartbeats are not stored")
        if event.job_id != self.job_id:
            raise ValueError("the event belongs to another job")
        if self.finished:
            raise ValueError("the job's stream has ended")

    def __len__(self) -> int:
        return len(self._events)

    def __repr__(self) -> str:
        return f"EventLog(job_id={self.job_id!r}, last_id={self.last_id}, finished={self.finished})"


def _epoch(value: object) -> float:
    """Epoch seconds of an ISO 8601 ``ts`` (0.0 when it is missing or malformed)."""
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def event_from(name: str, seq: int, data: Mapping[str, Any]) -> JobEvent | None:
    """The record of an event read back from its wire form (an SSE message or a stored row):
    the inverse of :meth:`JobEvent.data`.

    Args:
        name: The SSE ``event:`` name.
        seq: Its ``id:`` (0 for none).
        data: The decoded JSON payload.

    Returns:
        The record; None for an event name this vocabulary does not have (a newer server's).

    Raises:
        ValueError: A known event whose payload is malformed (a field missing or of the
            wrong type).
    """
    try:
        job_id = str(data["job_id"])
        if name == PhaseUpdate.name:
            counts = data.get("items") or {}
            return PhaseUpdate(
                job_id=job_id,
                seq=seq,
                phase=str(data["phase"]),
                progress=float(data["progress"]),
                items=ItemCounts(**{k: int(counts.get(k, 0)) for k in ("total", "ok", "failed")}),
                ts=_epoch(data.get("ts")),
            )
        if name == ItemFailed.name:
            return ItemFailed(
                job_id=job_id,
                seq=seq,
                item=str(data["item"]),
                reason=str(data["reason"]),
                retryable=bool(data["retryable"]),
            )
        if name == Heartbeat.name:
            return Heartbeat(
                job_id=job_id,
                seq=seq,
                status=JobStatus(data.get("status", "running")),
                ts=_epoch(data.get("ts")),
            )
        if name == Completed.name:
            return Completed(job_id=job_id, seq=seq, status=JobStatus(data["status"]))
        if name == Failed.name:
            error = data.get("error") or {}
            return Failed(
                job_id=job_id,
                seq=seq,
                error=JobError(str(error.get("type", "failed")), str(error.get("message", ""))),
            )
        if name == Canceled.name:
            return Canceled(job_id=job_id, seq=seq, ts=_epoch(data.get("ts")))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed {name} event: {exc.__class__.__name__}") from None
    return None
