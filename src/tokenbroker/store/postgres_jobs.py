"""The PostgreSQL backend's jobs (:class:`~.base.JobStore`): fenced job leases, events, schedules.

Every decision is one statement on the database clock (:data:`~.postgres_schema.NOW`), so no
replica's clock and no held connection takes part. In READ COMMITTED a fenced ``UPDATE …
RETURNING`` that meets a rival's row lock waits, re-checks its ``WHERE`` against the rival's
committed row and returns nothing: of racing claims exactly one wins, and a stale owner's
heartbeat, save or append changes nothing. Events are numbered by the job row's
``event_seq``, moved on by the same fenced ``UPDATE`` that authorises them, and inserted in
its transaction: the row lock it holds keeps the numbers gapless. The idempotent add is an
``INSERT … ON CONFLICT`` on the partial unique index over active statuses (migration 2 of
:mod:`.postgres_schema`): a racing rival's uncommitted insert is waited for, then seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ..errors import StoreError
from .postgres_connection import PostgresConnection
from .postgres_schema import NOW
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

__all__ = ["PostgresJobs"]

_COLUMNS = (
    "id, kind, status, requested_by, idem_key, document, created_at, finished_at, owner,"
    " fence, lease_expires_at, heartbeat_at, event_seq, seq"
)
_ACTIVE = "('" + "', '".join(ACTIVE_JOB_STATUSES) + "')"
_FINAL = "('" + "', '".join(FINAL_JOB_STATUSES) + "')"
#: How often :meth:`PostgresJobs.add_job` retries when the active job that refused its key
#: finished before it could be read (each retry either adds or finds a live rival).
_ADD_ATTEMPTS = 5


def _row(v: Sequence[Any]) -> JobRow:
    return JobRow(
        v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], str(v[13])
    )


def _fetch_row(cur: psycopg.Cursor[Any]) -> JobRow | None:
    found = cur.fetchone()
    return None if found is None else _row(found)


class PostgresJobs:
    """The :class:`~.base.JobStore` half of :class:`~.postgres.PostgresStore` (a mixin: the
    store provides ``_conn``)."""

    _conn: PostgresConnection

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
            StoreError: ``job_id`` exists already (nothing changes).
        """
        for _ in range(_ADD_ATTEMPTS):
            with self._conn.tx() as cur:
                try:
                    cur.execute(
                        "INSERT INTO tb_job (id, kind, status, requested_by, idem_key, document,"
                        " created_at) VALUES (%s, %s, 'queued', %s, %s, %s, %s)"
                        f" ON CONFLICT (idem_key) WHERE status IN {_ACTIVE} DO NOTHING"
                        f" RETURNING {_COLUMNS}",
                        (job_id, kind, requested_by, idempotency_key, document, created_at),
                    )
                except psycopg.errors.UniqueViolation:
                    # Not the idempotency index (that one is the arbiter): the id is taken.
                    raise StoreError("a job with this id exists already") from None
                added = _fetch_row(cur)
                if added is not None:
                    return added, False
                cur.execute(
                    f"SELECT {_COLUMNS} FROM tb_job WHERE idem_key = %s AND status IN {_ACTIVE}",
                    (idempotency_key,),
                )
                active = _fetch_row(cur)
            if active is not None:
                return active, True
        raise StoreError("the job could not be added: its idempotency key stayed contended")

    def job(self, job_id: str) -> JobRow | None:
        """One job, or None for an unknown id."""
        with self._conn.tx() as cur:
            cur.execute(f"SELECT {_COLUMNS} FROM tb_job WHERE id = %s", (job_id,))
            return _fetch_row(cur)

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
        where: list[str] = ["true"]
        params: list[Any] = []
        if statuses is not None:
            where.append("status = ANY(%s)")
            params.append(list(statuses))
        if kind is not None:
            where.append("kind = %s")
            params.append(kind)
        if position is not None:
            where.append("seq > %s" if oldest_first else "seq < %s")
            params.append(position)
        order = "ASC" if oldest_first else "DESC"
        with self._conn.tx() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM tb_job WHERE {' AND '.join(where)}"
                f" ORDER BY seq {order} LIMIT %s",
                (*params, limit + 1),
            )
            found = cur.fetchall()
        rows = [_row(r) for r in found[:limit]]
        return JobPage(rows, rows[-1].cursor if len(found) > limit else None)

    def claim_job(self, job_id: str, owner: str, ttl: float) -> JobLease | None:
        """Take a job's lease: from queued, or from an expired running/canceling lease."""
        with self._conn.tx() as cur:
            cur.execute(
                f"UPDATE tb_job SET owner = %s, fence = fence + 1, lease_expires_at = {NOW} + %s,"
                f" heartbeat_at = {NOW}, status = CASE status WHEN 'queued' THEN 'running'"
                " ELSE status END WHERE id = %s AND (status = 'queued' OR (status IN"
                " ('running', 'canceling') AND (lease_expires_at IS NULL"
                f" OR lease_expires_at < {NOW}))) RETURNING fence, lease_expires_at",
                (owner, float(ttl), job_id),
            )
            row = cur.fetchone()
        return None if row is None else JobLease(job_id, owner, row[0], row[1])

    def heartbeat_job(self, lease: JobLease, ttl: float) -> JobRow | None:
        """Renew the lease, fenced; the row shows a cancel request."""
        with self._conn.tx() as cur:
            cur.execute(
                f"UPDATE tb_job SET lease_expires_at = {NOW} + %s, heartbeat_at = {NOW}"
                f" WHERE id = %s AND fence = %s AND owner = %s AND status IN {_ACTIVE}"
                f" RETURNING {_COLUMNS}",
                (float(ttl), lease.job_id, lease.fence, lease.owner),
            )
            return _fetch_row(cur)

    def save_job(
        self,
        lease: JobLease,
        status: str,
        document: str,
        events: Sequence[NewJobEvent] = (),
    ) -> JobRow | None:
        """Write status, document and events in one transaction, fenced (see the protocol)."""
        final = status in FINAL_JOB_STATUSES
        release = final or status == "queued"
        with self._conn.tx() as cur:
            cur.execute(
                "UPDATE tb_job SET document = %s, status = CASE WHEN status = 'canceling'"
                " AND %s THEN 'canceling' ELSE %s::text END,"
                f" finished_at = CASE WHEN %s THEN {NOW} ELSE finished_at END,"
                " owner = CASE WHEN %s THEN NULL ELSE owner END,"
                " lease_expires_at = CASE WHEN %s THEN NULL ELSE lease_expires_at END,"
                " event_seq = event_seq + %s"
                f" WHERE id = %s AND fence = %s AND owner = %s AND status IN {_ACTIVE}"
                f" RETURNING {_COLUMNS}",
                (
                    document,
                    status == "running",
                    status,
                    final,
                    release,
                    release,
                    len(events),
                    lease.job_id,
                    lease.fence,
                    lease.owner,
                ),
            )
            saved = _fetch_row(cur)
            if saved is not None:
                self._insert_events(cur, lease.job_id, saved.last_event, events)
        return saved

    def append_job_event(
        self, job_id: str, name: str, data: str, *, lease: JobLease | None = None
    ) -> int | None:
        """Append one event under the current lease (or to an unowned job), fenced."""
        with self._conn.tx() as cur:
            if lease is None:
                cur.execute(
                    "UPDATE tb_job SET event_seq = event_seq + 1 WHERE id = %s AND owner IS NULL"
                    " RETURNING event_seq",
                    (job_id,),
                )
            else:
                cur.execute(
                    "UPDATE tb_job SET event_seq = event_seq + 1"
                    " WHERE id = %s AND fence = %s AND owner = %s RETURNING event_seq",
                    (job_id, lease.fence, lease.owner),
                )
            found = cur.fetchone()
            if found is None:
                return None
            seq: int = found[0]
            self._insert_events(cur, job_id, seq, [(name, data)])
        return seq

    def cancel_job(self, job_id: str, event: NewJobEvent) -> JobRow | None:
        """Queued → canceled (with ``event``); running → canceling; others unchanged."""
        with self._conn.tx() as cur:
            # FOR UPDATE: a claim cannot turn queued into running between this read and the
            # write below (it waits, then finds the job canceled).
            cur.execute("SELECT status FROM tb_job WHERE id = %s FOR UPDATE", (job_id,))
            found = cur.fetchone()
            if found is None:
                return None
            if found[0] == "queued":
                cur.execute(
                    f"UPDATE tb_job SET status = 'canceled', finished_at = {NOW}, owner = NULL,"
                    " lease_expires_at = NULL, event_seq = event_seq + 1 WHERE id = %s"
                    f" RETURNING {_COLUMNS}",
                    (job_id,),
                )
                canceled = _fetch_row(cur)
                assert canceled is not None, "the row is locked by this transaction"
                self._insert_events(cur, job_id, canceled.last_event, [event])
                return canceled
            if found[0] == "running":
                cur.execute("UPDATE tb_job SET status = 'canceling' WHERE id = %s", (job_id,))
            cur.execute(f"SELECT {_COLUMNS} FROM tb_job WHERE id = %s", (job_id,))
            return _fetch_row(cur)

    def expired_jobs(self) -> list[JobRow]:
        """Running or canceling jobs whose lease expired on the database clock."""
        with self._conn.tx() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM tb_job WHERE status IN ('running', 'canceling')"
                f" AND (lease_expires_at IS NULL OR lease_expires_at < {NOW}) ORDER BY seq"
            )
            return [_row(r) for r in cur.fetchall()]

    def job_events(
        self, job_id: str, after: int = 0, limit: int | None = None
    ) -> list[JobEventRow]:
        """A job's events after ``after``, in order (``LIMIT NULL`` is no limit)."""
        with self._conn.tx() as cur:
            cur.execute(
                "SELECT job_id, seq, name, data, at FROM tb_job_event WHERE job_id = %s"
                " AND seq > %s ORDER BY seq LIMIT %s",
                (job_id, after, limit),
            )
            return [JobEventRow(*r) for r in cur.fetchall()]

    def prune_jobs(self, ttl: float) -> int:
        """Delete finished jobs (their events go by the foreign key's cascade) and schedule
        claims older than ``ttl`` on the database clock."""
        with self._conn.tx() as cur:
            cur.execute(
                f"DELETE FROM tb_job WHERE status IN {_FINAL} AND finished_at < {NOW} - %s",
                (float(ttl),),
            )
            pruned = cur.rowcount
            cur.execute(f"DELETE FROM tb_job_schedule WHERE claimed_at < {NOW} - %s", (float(ttl),))
        return pruned

    def claim_schedule(self, name: str, period: str, owner: str) -> bool:
        """Claim one period of a schedule; exactly one claimer gets True (a rival's insert
        waits for the first one's transaction, then conflicts)."""
        with self._conn.tx() as cur:
            cur.execute(
                "INSERT INTO tb_job_schedule (name, period, owner, claimed_at)"
                f" VALUES (%s, %s, %s, {NOW}) ON CONFLICT (name, period) DO NOTHING",
                (name, period, owner),
            )
            return cur.rowcount == 1

    @staticmethod
    def _insert_events(
        cur: psycopg.Cursor[Any], job_id: str, last: int, events: Sequence[NewJobEvent]
    ) -> None:
        """Store ``events`` as the ones numbered up to ``last`` (the job row's new
        ``event_seq``, already moved on in the caller's transaction, which holds its lock)."""
        if not events:
            return
        first = last - len(events) + 1
        cur.executemany(
            "INSERT INTO tb_job_event (job_id, seq, name, data, at)"
            f" VALUES (%s, %s, %s, %s, {NOW})",
            [(job_id, first + n, name, data) for n, (name, data) in enumerate(events)],
        )
