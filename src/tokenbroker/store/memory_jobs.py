"""The memory backend's jobs (:class:`~.base.JobStore`), under the memory store's one lock.

Every check is made before anything is written, all under :attr:`MemoryState.lock`, so the
memory backend keeps the same promises as SQLite's transactions: one claimer wins, a stale
fence writes nothing, an event and the save that adds it appear together.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ..errors import StoreError
from .rows import (
    ACTIVE_JOB_STATUSES,
    FINAL_JOB_STATUSES,
    JobEventRow,
    JobLease,
    JobPage,
    JobRow,
    NewJobEvent,
)
from .sqlite_jobs import parse_cursor

__all__ = ["MemoryJobs"]


def _row(job: dict[str, Any]) -> JobRow:
    return JobRow(
        id=job["id"],
        kind=job["kind"],
        status=job["status"],
        requested_by=job["requested_by"],
        idempotency_key=job["idem_key"],
        document=job["document"],
        created_at=job["created_at"],
        finished_at=job["finished_at"],
        owner=job["owner"],
        fence=job["fence"],
        lease_expires_at=job["lease_expires_at"],
        heartbeat_at=job["heartbeat_at"],
        last_event=job["event_seq"],
        cursor=str(job["seq"]),
    )


class MemoryJobs:
    """The :class:`~.base.JobStore` half of :class:`~.memory.MemoryStore` (a mixin: the
    store provides ``_lock``, ``_tables``, ``_job_events``, ``_schedules``, ``_next_job``
    and ``now``)."""

    _lock: threading.RLock
    _tables: dict[str, dict[Any, dict[str, Any]]]
    _job_events: dict[str, list[JobEventRow]]
    _schedules: dict[tuple[str, str], float]

    def now(self) -> float:  # pragma: no cover - provided by the store
        raise NotImplementedError

    def _next_job(self) -> int:  # pragma: no cover - provided by the store
        raise NotImplementedError

    def add_job(
        self,
        job_id: str,
        kind: str,
        idempotency_key: str,
        requested_by: str,
        document: str,
        created_at: float,
    ) -> tuple[JobRow, bool]:
        """Queue a job unless an active one has the same key (see the protocol).

        Raises:
            StoreError: ``job_id`` exists already.
        """
        with self._lock:
            jobs = self._tables["tb_job"]
            for job in jobs.values():
                if job["idem_key"] == idempotency_key and job["status"] in ACTIVE_JOB_STATUSES:
                    return _row(job), True
            if job_id in jobs:
                raise StoreError("a job with this id exists already")
            jobs[job_id] = {
                "seq": self._next_job(),
                "id": job_id,
                "kind": kind,
                "status": "queued",
                "requested_by": requested_by,
                "idem_key": idempotency_key,
                "document": document,
                "created_at": created_at,
                "finished_at": None,
                "owner": None,
                "fence": 0,
                "lease_expires_at": None,
                "heartbeat_at": None,
                "event_seq": 0,
            }
            self._job_events[job_id] = []
            return _row(jobs[job_id]), False

    def job(self, job_id: str) -> JobRow | None:
        """One job, or None for an unknown id."""
        with self._lock:
            job = self._tables["tb_job"].get(job_id)
            return None if job is None else _row(job)

    def jobs(
        self,
        *,
        statuses: Sequence[str] | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        oldest_first: bool = False,
    ) -> JobPage:
        """Jobs newest (or oldest) first, filtered, paginated (see the protocol).

        Raises:
            ValueError: A malformed cursor or a limit below 1.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        position = parse_cursor(cursor)
        with self._lock:
            found = [
                job
                for job in self._tables["tb_job"].values()
                if (statuses is None or job["status"] in statuses)
                and (kind is None or job["kind"] == kind)
                and (
                    position is None
                    or (job["seq"] > position if oldest_first else job["seq"] < position)
                )
            ]
            found.sort(key=lambda job: int(job["seq"]), reverse=not oldest_first)
            rows = [_row(job) for job in found[:limit]]
        return JobPage(rows, rows[-1].cursor if len(found) > limit else None)

    def claim_job(self, job_id: str, owner: str, ttl: float) -> JobLease | None:
        """Take a job's lease: from queued, or from an expired running/canceling lease."""
        with self._lock:
            now = self.now()
            job = self._tables["tb_job"].get(job_id)
            if job is None:
                return None
            expired = job["lease_expires_at"] is None or job["lease_expires_at"] < now
            if job["status"] == "queued":
                job["status"] = "running"
            elif not (job["status"] in ("running", "canceling") and expired):
                return None
            job.update(owner=owner, fence=job["fence"] + 1, heartbeat_at=now)
            job["lease_expires_at"] = now + ttl
            return JobLease(job_id, owner, job["fence"], now + ttl)

    def heartbeat_job(self, lease: JobLease, ttl: float) -> JobRow | None:
        """Renew the lease, fenced; the row shows a cancel request."""
        with self._lock:
            job = self._held_job(lease)
            if job is None:
                return None
            now = self.now()
            job.update(lease_expires_at=now + ttl, heartbeat_at=now)
            return _row(job)

    def save_job(
        self,
        lease: JobLease,
        status: str,
        document: str,
        events: Sequence[NewJobEvent] = (),
    ) -> JobRow | None:
        """Write status, document and events together, fenced (see the protocol)."""
        with self._lock:
            job = self._held_job(lease)
            if job is None:
                return None
            if not (job["status"] == "canceling" and status == "running"):
                job["status"] = status
            job["document"] = document
            if status in FINAL_JOB_STATUSES:
                job["finished_at"] = self.now()
            if status in FINAL_JOB_STATUSES or status == "queued":
                job.update(owner=None, lease_expires_at=None)
            for name, data in events:
                self._append(job, name, data)
            return _row(job)

    def append_job_event(
        self, job_id: str, name: str, data: str, *, lease: JobLease | None = None
    ) -> int | None:
        """Append one event under the current lease (or to an unowned job), fenced."""
        with self._lock:
            job = self._tables["tb_job"].get(job_id)
            if job is None:
                return None
            if lease is None and job["owner"] is not None:
                return None
            if lease is not None and (job["fence"], job["owner"]) != (lease.fence, lease.owner):
                return None
            return self._append(job, name, data)

    def cancel_job(self, job_id: str, event: NewJobEvent) -> JobRow | None:
        """Queued → canceled (with ``event``); running → canceling; others unchanged."""
        with self._lock:
            job = self._tables["tb_job"].get(job_id)
            if job is None:
                return None
            if job["status"] == "queued":
                job.update(status="canceled", finished_at=self.now())
                job.update(owner=None, lease_expires_at=None)
                self._append(job, *event)
            elif job["status"] == "running":
                job["status"] = "canceling"
            return _row(job)

    def expired_jobs(self) -> list[JobRow]:
        """Running or canceling jobs whose lease expired on the store's clock."""
        with self._lock:
            now = self.now()
            found = [
                job
                for job in self._tables["tb_job"].values()
                if job["status"] in ("running", "canceling")
                and (job["lease_expires_at"] is None or job["lease_expires_at"] < now)
            ]
            return [_row(job) for job in sorted(found, key=lambda job: int(job["seq"]))]

    def job_events(
        self, job_id: str, after: int = 0, limit: int | None = None
    ) -> list[JobEventRow]:
        """A job's events after ``after``, in order."""
        with self._lock:
            events = [e for e in self._job_events.get(job_id, []) if e.seq > after]
        return events if limit is None else events[:limit]

    def prune_jobs(self, ttl: float) -> int:
        """Delete finished jobs (and their events) and schedule claims older than ``ttl``."""
        with self._lock:
            cutoff = self.now() - ttl
            jobs = self._tables["tb_job"]
            old = [
                job_id
                for job_id, job in jobs.items()
                if job["status"] in FINAL_JOB_STATUSES and job["finished_at"] < cutoff
            ]
            for job_id in old:
                del jobs[job_id]
                self._job_events.pop(job_id, None)
            for claim in [c for c, at in self._schedules.items() if at < cutoff]:
                del self._schedules[claim]
            return len(old)

    def claim_schedule(self, name: str, period: str, owner: str) -> bool:
        """Claim one period of a schedule; exactly one claimer gets True."""
        with self._lock:
            if (name, period) in self._schedules:
                return False
            self._schedules[(name, period)] = self.now()
            return True

    def _held_job(self, lease: JobLease) -> dict[str, Any] | None:
        """The job if ``lease`` is its current one and it is active; the caller holds the lock."""
        job = self._tables["tb_job"].get(lease.job_id)
        if job is None or (job["fence"], job["owner"]) != (lease.fence, lease.owner):
            return None
        return job if job["status"] in ACTIVE_JOB_STATUSES else None

    def _append(self, job: dict[str, Any], name: str, data: str) -> int:
        job["event_seq"] += 1
        event = JobEventRow(job["id"], job["event_seq"], name, data, self.now())
        self._job_events.setdefault(job["id"], []).append(event)
        return event.seq
