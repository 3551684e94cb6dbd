"""The SQLite backend's jobs (:class:`~.base.JobStore`): fenced job leases, events, schedules.

Every write runs in one ``BEGIN IMMEDIATE`` transaction, so a check and the write it guards
cannot be separated by another process; times that leases and pruning depend on come from
the database clock (:data:`~.sqlite_schema.NOW`). A job's events live in ``tb_job_event``,
numbered by the job row's ``event_seq`` inside the transaction that adds them.
"""

from __future__ import annotations

import sqlite3
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
from .sqlite_connection import SQLiteConnection
from .sqlite_schema import NOW

__all__ = ["SQLiteJobs", "parse_cursor"]

_COLUMNS = (
    "id, kind, status, requested_by, idem_key, document, created_at, finished_at, owner,"
    " fence, lease_expires_at, heartbeat_at, event_seq, seq"
)
_ACTIVE = "('" + "', '".join(ACTIVE_JOB_STATUSES) + "')"
_FINAL = "('" + "', '".join(FINAL_JOB_STATUSES) + "')"


def parse_cursor(cursor: str | None) -> int | None:
    """The position in a :class:`~.rows.JobPage` cursor (a decimal insertion number).

    Raises:
        ValueError: For anything but a positive decimal integer.
    """
    if cursor is None:
        return None
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 18 or int(cursor) < 1:
        raise ValueError("malformed job cursor")
    return int(cursor)


def _row(v: Sequence[Any]) -> JobRow:
    return JobRow(
        v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], str(v[13])
    )


class SQLiteJobs:
    """The :class:`~.base.JobStore` half of :class:`~.sqlite.SQLiteStore` (a mixin: the
    store provides ``_conn`` and ``_db``)."""

    _conn: SQLiteConnection
    _db: sqlite3.Connection

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
        with self._conn.tx():
            active = self._db.execute(
                f"SELECT {_COLUMNS} FROM tb_job WHERE idem_key = ? AND status IN {_ACTIVE}",
                (idempotency_key,),
            ).fetchone()
            if active is not None:
                return _row(active), True
            if self._db.execute("SELECT 1 FROM tb_job WHERE id = ?", (job_id,)).fetchone():
                raise StoreError("a job with this id exists already")
            self._db.execute(
                "INSERT INTO tb_job (id, kind, status, requested_by, idem_key, document,"
                " created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, kind, requested_by, idempotency_key, document, created_at),
            )
            added = self._select(job_id)
        assert added is not None
        return added, False

    def job(self, job_id: str) -> JobRow | None:
        """One job, or None for an unknown id."""
        with self._conn.guard():
            return self._select(job_id)

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
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if statuses is not None:
            where.append(f"status IN ({', '.join('?' * len(statuses)) or 'NULL'})")
            params += list(statuses)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if position is not None:
            where.append("seq > ?" if oldest_first else "seq < ?")
            params.append(position)
        order = "ASC" if oldest_first else "DESC"
        with self._conn.guard():
            found = self._db.execute(
                f"SELECT {_COLUMNS} FROM tb_job WHERE {' AND '.join(where)}"
                f" ORDER BY seq {order} LIMIT ?",
                (*params, limit + 1),
            ).fetchall()
        rows = [_row(r) for r in found[:limit]]
        return JobPage(rows, rows[-1].cursor if len(found) > limit else None)

    def claim_job(self, job_id: str, owner: str, ttl: float) -> JobLease | None:
        """Take a job's lease: from queued, or from an expired running/canceling lease."""
        with self._conn.tx():
            row = self._db.execute(
                f"UPDATE tb_job SET owner = ?, fence = fence + 1, lease_expires_at = {NOW} + ?,"
                f" heartbeat_at = {NOW}, status = CASE status WHEN 'queued' THEN 'running'"
                " ELSE status END WHERE id = ? AND (status = 'queued' OR (status IN"
                f" ('running', 'canceling') AND (lease_expires_at IS NULL"
                f" OR lease_expires_at < {NOW}))) RETURNING fence, lease_expires_at",
                (owner, ttl, job_id),
            ).fetchone()
        return None if row is None else JobLease(job_id, owner, row[0], row[1])

    def heartbeat_job(self, lease: JobLease, ttl: float) -> JobRow | None:
        """Renew the lease, fenced; the row shows a cancel request."""
        with self._conn.tx():
            changed = self._db.execute(
                f"UPDATE tb_job SET lease_expires_at = {NOW} + ?, heartbeat_at = {NOW}"
                f" WHERE id = ? AND fence = ? AND owner = ? AND status IN {_ACTIVE}",
                (ttl, lease.job_id, lease.fence, lease.owner),
            ).rowcount
            return self._select(lease.job_id) if changed else None

    def save_job(
        self,
        lease: JobLease,
        status: str,
        document: str,
        events: Sequence[NewJobEvent] = (),
    ) -> JobRow | None:
        """Write status, document and events in one transaction, fenced (see the protocol)."""
        release = status in FINAL_JOB_STATUSES or status == "queued"
        with self._conn.tx():
            changed = self._db.execute(
                "UPDATE tb_job SET document = ?, status = CASE WHEN status = 'canceling'"
                " AND ? = 'running' THEN 'canceling' ELSE ? END,"
                f" finished_at = CASE WHEN ? THEN {NOW} ELSE finished_at END,"
                " owner = CASE WHEN ? THEN NULL ELSE owner END,"
                " lease_expires_at = CASE WHEN ? THEN NULL ELSE lease_expires_at END"
                f" WHERE id = ? AND fence = ? AND owner = ? AND status IN {_ACTIVE}",
                (
                    document,
                    status,
                    status,
                    status in FINAL_JOB_STATUSES,
                    release,
                    release,
                    lease.job_id,
                    lease.fence,
                    lease.owner,
                ),
            ).rowcount
            if not changed:
                return None
            for name, data in events:
                self._append(lease.job_id, name, data)
            return self._select(lease.job_id)

    def append_job_event(
        self, job_id: str, name: str, data: str, *, lease: JobLease | None = None
    ) -> int | None:
        """Append one event under the current lease (or to an unowned job), fenced."""
        with self._conn.tx():
            if lease is None:
                held = self._db.execute(
                    "SELECT 1 FROM tb_job WHERE id = ? AND owner IS NULL", (job_id,)
                ).fetchone()
            else:
                held = self._db.execute(
                    "SELECT 1 FROM tb_job WHERE id = ? AND fence = ? AND owner = ?",
                    (job_id, lease.fence, lease.owner),
                ).fetchone()
            return None if held is None else self._append(job_id, name, data)

    def cancel_job(self, job_id: str, event: NewJobEvent) -> JobRow | None:
        """Queued → canceled (with ``event``); running → canceling; others unchanged."""
        with self._conn.tx():
            status = self._db.execute(
                "SELECT status FROM tb_job WHERE id = ?", (job_id,)
            ).fetchone()
            if status is None:
                return None
            if status[0] == "queued":
                self._db.execute(
                    f"UPDATE tb_job SET status = 'canceled', finished_at = {NOW},"
                    " owner = NULL, lease_expires_at = NULL WHERE id = ?",
                    (job_id,),
                )
                self._append(job_id, *event)
            elif status[0] == "running":
                self._db.execute("UPDATE tb_job SET status = 'canceling' WHERE id = ?", (job_id,))
            return self._select(job_id)

    def expired_jobs(self) -> list[JobRow]:
        """Running or canceling jobs whose lease expired on the database clock."""
        with self._conn.guard():
            found = self._db.execute(
                f"SELECT {_COLUMNS} FROM tb_job WHERE status IN ('running', 'canceling')"
                f" AND (lease_expires_at IS NULL OR lease_expires_at < {NOW}) ORDER BY seq"
            ).fetchall()
        return [_row(r) for r in found]

    def job_events(
        self, job_id: str, after: int = 0, limit: int | None = None
    ) -> list[JobEventRow]:
        """A job's events after ``after``, in order."""
        with self._conn.guard():
            found = self._db.execute(
                "SELECT job_id, seq, name, data, at FROM tb_job_event WHERE job_id = ?"
                " AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after, -1 if limit is None else limit),
            ).fetchall()
        return [JobEventRow(*r) for r in found]

    def prune_jobs(self, ttl: float) -> int:
        """Delete finished jobs (and their events) and schedule claims older than ``ttl``."""
        with self._conn.tx():
            self._db.execute(
                "DELETE FROM tb_job_event WHERE job_id IN (SELECT id FROM tb_job WHERE"
                f" status IN {_FINAL} AND finished_at < {NOW} - ?)",
                (ttl,),
            )
            pruned = self._db.execute(
                f"DELETE FROM tb_job WHERE status IN {_FINAL} AND finished_at < {NOW} - ?",
                (ttl,),
            ).rowcount
            self._db.execute(f"DELETE FROM tb_job_schedule WHERE claimed_at < {NOW} - ?", (ttl,))
        return pruned

    def claim_schedule(self, name: str, period: str, owner: str) -> bool:
        """Claim one period of a schedule; exactly one claimer gets True."""
        with self._conn.tx():
            return (
                self._db.execute(
                    "INSERT INTO tb_job_schedule (name, period, owner, claimed_at)"
                    f" VALUES (?, ?, ?, {NOW}) ON CONFLICT (name, period) DO NOTHING",
                    (name, period, owner),
                ).rowcount
                == 1
            )

    def _select(self, job_id: str) -> JobRow | None:
        found = self._db.execute(
            f"SELECT {_COLUMNS} FROM tb_job WHERE id = ?", (job_id,)
        ).fetchone()
        return None if found is None else _row(found)

    def _append(self, job_id: str, name: str, data: str) -> int:
        """Number and store one event (inside the caller's transaction)."""
        seq: int = self._db.execute(
            "UPDATE tb_job SET event_seq = event_seq + 1 WHERE id = ? RETURNING event_seq",
            (job_id,),
        ).fetchone()[0]
        self._db.execute(
            f"INSERT INTO tb_job_event (job_id, seq, name, data, at) VALUES (?, ?, ?, ?, {NOW})",
            (job_id, seq, name, data),
        )
        return seq
