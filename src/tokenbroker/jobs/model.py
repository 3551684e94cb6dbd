"""The job record and its states: what a job is, which moves between states are legal.

::

    queued ──► running ──► done | partial | failed
      │           │  ▲
      │           │  └── (re-queued: the reaper resumes an idempotent job whose lease expired)
      │           └──► canceling ──► canceled (or done | partial | failed, if the work
      │                                        finished before it saw the request)
      └──► canceled | failed   (nothing ran: canceled at once, or refused at start)

``canceling`` lasts until the work has really stopped; ``canceled`` is reported only then.
Final states (:attr:`JobStatus.final`) have no way out. :class:`Job` is a frozen value:
every change is a new record (:meth:`Job.moved_to`, :func:`dataclasses.replace`), so the
store can compare-and-set on it. Times are seconds since the Unix epoch, read from an
injected :class:`tokenbroker.core.clock.Clock` by the caller, and rendered as UTC ISO 8601.
Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeAlias

from tokenbroker.errors import TokenBrokerError

__all__ = [
    "JOB_ID_BYTES",
    "KIND_NAME",
    "TRANSITIONS",
    "FailedItem",
    "ItemCounts",
    "Job",
    "JobError",
    "JobStatus",
    "JobTransitionError",
    "JsonValue",
    "canonical_params",
    "check_transition",
    "idempotency_key",
    "iso8601",
    "new_job_id",
]

#: A value JSON can carry.
JsonValue: TypeAlias = "str | int | float | bool | list[JsonValue] | dict[str, JsonValue] | None"

#: Random bytes in a job id: 128 bits, so ids can be neither guessed nor enumerated.
JOB_ID_BYTES = 16
#: A job kind's name (``warm``, ``rotate_key``): snake case, as it appears in URLs and labels.
KIND_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


class JobStatus(StrEnum):
    """Where a job is in its life; the value is the word the API and the store use."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELING = "canceling"
    DONE = "done"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        """True for the states a job never leaves (done, partial, failed, canceled)."""
        return not TRANSITIONS[self]


_ENDINGS = frozenset({JobStatus.DONE, JobStatus.PARTIAL, JobStatus.FAILED})

#: The legal moves: each status and the statuses it may move to.
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = MappingProxyType(
    {
        JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
        JobStatus.RUNNING: _ENDINGS | {JobStatus.CANCELING, JobStatus.QUEUED},
        JobStatus.CANCELING: _ENDINGS | {JobStatus.CANCELED},
        JobStatus.DONE: frozenset(),
        JobStatus.PARTIAL: frozenset(),
        JobStatus.FAILED: frozenset(),
        JobStatus.CANCELED: frozenset(),
    }
)


class JobTransitionError(TokenBrokerError, ValueError):
    """A job was asked to move between two statuses that :data:`TRANSITIONS` does not link;
    ``current`` and ``wanted`` name them."""

    def __init__(self, current: JobStatus, wanted: JobStatus) -> None:
        self.current = current
        self.wanted = wanted
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none (final)"
        super().__init__(f"a {current.value} job cannot become {wanted.value}; allowed: {allowed}")


def check_transition(current: JobStatus, wanted: JobStatus) -> None:
    """Refuse an illegal move.

    Raises:
        JobTransitionError: When ``wanted`` is not in ``TRANSITIONS[current]`` (staying in
            the same status is not a move either).
    """
    if wanted not in TRANSITIONS[current]:
        raise JobTransitionError(current, wanted)


def new_job_id() -> str:
    """A fresh job id: ``job_`` + 22 URL-safe characters from :func:`secrets.token_urlsafe`
    (:data:`JOB_ID_BYTES` = 128 random bits)."""
    return "job_" + secrets.token_urlsafe(JOB_ID_BYTES)


def canonical_params(params: Mapping[str, Any]) -> str:
    """The one text of a job's params, the same for equal params whatever their key order:
    JSON, keys sorted, no spaces, no NaN or infinity.

    Raises:
        ValueError: For a value JSON cannot carry (a set, bytes, NaN, a non-string key).
    """
    try:
        return json.dumps(
            dict(params), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"job params must be JSON values: {exc}") from exc


def idempotency_key(kind: str, params: Mapping[str, Any]) -> str:
    """The key under which a queued or running job answers a repeated request: ``KIND:`` +
    the SHA-256 (hex) of the kind and :func:`canonical_params` (equal for the same kind and
    params in any key order; of fixed length for a unique index).

    Raises:
        ValueError: As for :func:`canonical_params`.
    """
    digest = hashlib.sha256(f"{kind}\n{canonical_params(params)}".encode()).hexdigest()
    return f"{kind}:{digest}"


def iso8601(seconds: float | None) -> str | None:
    """Epoch seconds as UTC ISO 8601 with milliseconds and ``Z`` (None stays None)."""
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ItemCounts:
    """How many of a job's items there are (``total``) and how many ended ``ok`` or ``failed``.

    Raises:
        ValueError: For a negative count, or more ended items than there are.
    """

    total: int = 0
    ok: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        if min(self.total, self.ok, self.failed) < 0 or self.ok + self.failed > self.total:
            raise ValueError(f"inconsistent item counts: {self}")


@dataclass(frozen=True, slots=True)
class FailedItem:
    """One item that failed for good: its name (an account, a key id, a row; never a
    secret), the error's code and secret-free message, and whether a retry may succeed."""

    item: str
    reason: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class JobError:
    """Why a whole job failed: a snake-case ``type`` (``worker_lost``,
    ``provider_misconfigured``) and a secret-free ``message``."""

    type: str
    message: str


@dataclass(frozen=True, slots=True)
class Job:
    """One job, as stored and as the API shows it.

    Attributes:
        job_id: From :func:`new_job_id`.
        kind: The job kind (:data:`KIND_NAME`).
        params: The kind's params, JSON values; copied and read-only.
        requested_by: The consumer that started it.
        created_at: When it was queued (epoch seconds); ``updated_at`` starts there too.
        status: See :class:`JobStatus`.
        phase: The current phase's name, None before the first.
        progress: 0-100; callers keep it monotonic (:mod:`tokenbroker.jobs.progress`).
        started_at, updated_at, finished_at: When it first ran, last changed, and ended.
        owner: The instance running it (None when no instance holds it).
        heartbeat_at: The owner's last heartbeat.
        items: Item counts.
        failed: The items that failed for good.
        error: Why the job failed, for ``failed`` jobs that failed as a whole.
        metrics: Numbers the kind reports (durations, bytes), by name.

    Raises:
        ValueError: For a malformed kind, progress outside 0-100, or params that are not JSON.
    """

    job_id: str
    kind: str
    params: Mapping[str, Any]
    requested_by: str
    created_at: float
    status: JobStatus = JobStatus.QUEUED
    phase: str | None = None
    progress: float = 0.0
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    owner: str | None = None
    heartbeat_at: float | None = None
    items: ItemCounts = field(default_factory=ItemCounts)
    failed: tuple[FailedItem, ...] = ()
    error: JobError | None = None
    metrics: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not KIND_NAME.match(self.kind):
            raise ValueError(f"malformed job kind {self.kind!r}")
        if not 0.0 <= self.progress <= 100.0:
            raise ValueError(f"progress must be within 0-100, not {self.progress}")
        frozen = MappingProxyType(json.loads(canonical_params(self.params)))
        object.__setattr__(self, "params", frozen)
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "failed", tuple(self.failed))
        if self.updated_at is None:
            object.__setattr__(self, "updated_at", self.created_at)

    @property
    def idempotency_key(self) -> str:
        """:func:`idempotency_key` of this job's kind and params."""
        return idempotency_key(self.kind, self.params)

    def moved_to(self, status: JobStatus, *, at: float, **changes: Any) -> Job:
        """A new record of this job in ``status``; this one is unchanged.

        Args:
            status: The new status; must be legal from the current one.
            at: The time of the move (epoch seconds): ``updated_at``; also ``started_at``
                on the first move to running and ``finished_at`` on a move to a final status.
            **changes: Other fields to change at the same time (e.g. ``error``, ``owner``).

        Raises:
            JobTransitionError: For an illegal move.
        """
        check_transition(self.status, status)
        if status is JobStatus.RUNNING and self.started_at is None:
            changes.setdefault("started_at", at)
        if status.final:
            changes.setdefault("finished_at", at)
        return dataclasses.replace(self, status=status, updated_at=at, **changes)

    def to_dict(self) -> dict[str, JsonValue]:
        """The job as the API renders it: every field, times in UTC ISO 8601."""
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "params": json.loads(canonical_params(self.params)),
            "status": self.status.value,
            "phase": self.phase,
            "progress": round(self.progress, 2),
            "created_at": iso8601(self.created_at),
            "started_at": iso8601(self.started_at),
            "updated_at": iso8601(self.updated_at),
            "finished_at": iso8601(self.finished_at),
            "owner": self.owner,
            "heartbeat_at": iso8601(self.heartbeat_at),
            "items": asdict(self.items),
            "failed": [asdict(item) for item in self.failed],
            "error": None if self.error is None else asdict(self.error),
            "metrics": dict(self.metrics),
            "requested_by": self.requested_by,
        }
