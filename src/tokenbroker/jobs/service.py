"""The jobs service: the Python API for jobs, and the loop that runs them in one process.

``JobService(broker)`` is what the HTTP layer and the CLI call: :meth:`~JobService.start`,
:meth:`~JobService.get`, :meth:`~JobService.list`, :meth:`~JobService.cancel`,
:meth:`~JobService.retry`, :meth:`~JobService.events`, and :meth:`~JobService.subscribe`
(a wake-up for readers waiting on a job). These are quick store calls, safe from any thread.

:meth:`~JobService.run` is the instance's loop (an asyncio task; or
:meth:`~JobService.start_background` runs it in a thread of its own): at start-up and every
``jobs.poll_seconds`` (or at once when a job is started here) it reaps expired jobs
(:mod:`.reaper`), ticks the schedules (:mod:`.schedule`) and claims queued jobs up to
``jobs.max_running``, each run by :mod:`.runner`. Several processes on one store share the
work: the store's claims decide who runs what.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import secrets
import socket
import threading
from collections.abc import Mapping
from typing import Any

from ..config import JobsSettings
from ..core.clock import Clock, SystemClock
from ..engine.broker import Broker
from ..errors import (
    InvalidJobParamsError,
    JobLimitError,
    JobNotRetryableError,
    UnknownJobError,
)
from ..store import JobLease, JobRow
from ..store.rows import ACTIVE_JOB_STATUSES
from .authorization import Authorizations
from .document import Progress, StoredEvent, encode, event_data, job_of
from .events import Canceled
from .kinds import kind_for
from .model import Job, JobStatus, canonical_params, new_job_id
from .policy import retryable_items
from .reaper import Reaper
from .runner import JobRunner
from .schedule import Scheduler
from .subscriptions import Subscription, SubscriptionHub

__all__ = ["JobService"]

logger = logging.getLogger("tokenbroker.jobs")


class JobService:
    """Jobs of one broker: start, read, cancel, retry, follow; and run them.

    Args:
        broker: The broker (its store holds the jobs; its settings' ``jobs:`` section
            applies unless ``settings`` is given).
        settings: The ``jobs:`` settings to use instead.
        clock: Where job times come from (leases use the store's clock).
        owner: This instance's id in leases (default: host, pid and a random suffix).
    """

    def __init__(
        self,
        broker: Broker,
        *,
        settings: JobsSettings | None = None,
        clock: Clock | None = None,
        owner: str | None = None,
    ) -> None:
        self.broker = broker
        self.store = broker.store
        self.settings = settings or broker.settings.jobs
        self.clock = clock or SystemClock()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.hub = SubscriptionHub()
        self.runner = JobRunner(broker, self.settings, self.clock, self.hub.notify)
        self.authorizations = Authorizations(
            broker, self.settings, self.clock, self.owner, self.hub.notify
        )
        self.reaper = Reaper(
            self.store,
            self.runner,
            self.owner,
            self.settings,
            self._spawn,
            parked=self.authorizations.reap,
        )
        self.scheduler = Scheduler(self.store, self.settings.schedule, self.owner, self.start)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"JobService(owner={self.owner!r}, running={len(self._tasks)})"

    # -- the Python API ------------------------------------------------------------------------

    def start(self, kind: str, params: Mapping[str, Any], requested_by: str) -> tuple[Job, bool]:
        """Queue a job, or return the active job with the same kind and params.

        Args:
            kind: The job kind.
            params: Its params (JSON values; never a secret).
            requested_by: The consumer asking.

        Returns:
            ``(job, cached)``: ``cached`` is True when an active job was returned.

        Raises:
            UnknownJobKindError: Listing the kinds.
            InvalidJobParamsError: Naming the field at fault (or the params' size).
            JobLimitError: The consumer has ``max_running_per_consumer`` active jobs, or
                ``jobs.max_queued`` jobs wait queued already (the instance's limit).
            StoreError: The store failed.
        """
        job_kind = kind_for(kind)
        if not isinstance(params, Mapping):
            raise InvalidJobParamsError("", "must be an object")
        try:
            size = len(canonical_params(params).encode())
        except ValueError:
            raise InvalidJobParamsError("", "must be JSON values") from None
        if size > self.settings.max_params_bytes:
            raise InvalidJobParamsError("", f"larger than {self.settings.max_params_bytes} bytes")
        checked = job_kind.validate(params, self.broker.settings)
        job = Job(new_job_id(), kind, checked, requested_by, self.clock.time())
        active = self.store.jobs(statuses=ACTIVE_JOB_STATUSES, limit=1000).rows
        if not any(r.idempotency_key == job.idempotency_key for r in active):
            self._check_limits(active, requested_by)
        row, cached = self.store.add_job(
            job.job_id,
            kind,
            job.idempotency_key,
            requested_by,
            encode(job, Progress()),
            job.created_at,
        )
        if not cached:
            logger.info("job queued job_id=%s kind=%s", row.id, kind)
            if job_kind.parked:  # waits for a person, not for a worker
                row = self.authorizations.park(row)
            self.hub.notify(row.id)
            self.wake()
        return job_of(row), cached

    def _check_limits(self, active: builtins.list[JobRow], requested_by: str) -> None:
        """Refuse a new job beyond the consumer's or the instance's limit of active jobs.

        The instance's limit: it runs ``max_running`` jobs and queues at most
        ``max_queued`` more; a start that would queue beyond that is refused rather than
        left waiting behind a backlog (an operator sees the 429 at once and retries after
        ``Retry-After``). The queue is the store's, shared by every instance on it.

        Raises:
            JobLimitError: With ``retry_after`` in seconds.
        """
        retry_after = self.settings.poll_seconds * 5
        mine = [r for r in active if r.requested_by == requested_by]
        if len(mine) >= self.settings.max_running_per_consumer:
            raise JobLimitError(
                f"{requested_by} has {len(mine)} active jobs (the most allowed)",
                retry_after=retry_after,
            )
        queued = sum(1 for r in active if r.status == JobStatus.QUEUED.value)
        running = len(active) - queued
        # Both: with several instances on the store more than max_running run at once, and
        # a job queued a moment ago (not yet claimed) must not count while a slot is free.
        full = len(active) >= self.settings.max_running + self.settings.max_queued
        if queued >= self.settings.max_queued and full:
            raise JobLimitError(
                f"{queued} jobs are queued (the most allowed) behind {running} running",
                retry_after=retry_after,
            )

    def get(self, job_id: str) -> Job | None:
        """The job, or None for an unknown id (never a default state)."""
        row = self.store.job(job_id)
        return None if row is None else job_of(row)

    def require(self, job_id: str) -> Job:
        """The job.

        Raises:
            UnknownJobError: For an unknown id.
        """
        job = self.get(job_id)
        if job is None:
            raise UnknownJobError("no such job")
        return job

    def list(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first, filtered by status and kind, a page at a time.

        Returns:
            ``(jobs, next cursor)``; the cursor is None on the last page.

        Raises:
            ValueError: A malformed cursor, an unknown status, or a limit outside 1-1000.
        """
        if status is not None:
            JobStatus(status)  # ValueError for an unknown status
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be within 1-1000")
        page = self.store.jobs(
            statuses=None if status is None else [status], kind=kind, limit=limit, cursor=cursor
        )
        return [job_of(r) for r in page.rows], page.cursor

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop: a queued job is ``canceled`` at once; a running one becomes
        ``canceling`` and ``canceled`` once its work has stopped; a finished one is left.

        Returns:
            The job after the request.

        Raises:
            UnknownJobError: For an unknown id.
        """
        row = self.store.cancel_job(
            job_id, event_data(Canceled(job_id=job_id, ts=self.clock.time()))
        )
        if row is None:
            raise UnknownJobError("no such job")
        self.runner.request_cancel(job_id)
        self.hub.notify(job_id)
        return job_of(row)

    def retry(self, job_id: str, requested_by: str | None = None) -> tuple[Job, bool]:
        """A new job for only the failed retryable items of a ``partial``/``failed`` job.

        Returns:
            ``(job, cached)`` as :meth:`start`.

        Raises:
            UnknownJobError: For an unknown id.
            JobNotRetryableError: The job has not ended partial/failed, or no item of it
                failed retryably.
        """
        job = self.require(job_id)
        items = retryable_items(job.failed)
        if job.status not in (JobStatus.PARTIAL, JobStatus.FAILED) or not items:
            raise JobNotRetryableError("the job has no failed retryable items")
        params = {**job.params, "items": items}
        return self.start(job.kind, params, requested_by or job.requested_by)

    def events(self, job_id: str, after: int = 0) -> builtins.list[StoredEvent]:
        """The job's stored events with a sequence above ``after``, in order.

        Raises:
            UnknownJobError: For an unknown id.
        """
        rows = self.store.job_events(job_id, after)
        if not rows and self.store.job(job_id) is None:
            raise UnknownJobError("no such job")
        return [StoredEvent.from_row(r) for r in rows]

    def subscribe(self, job_id: str | None = None) -> Subscription:
        """A wake-up for changes of ``job_id`` (None: any job), in the running event loop;
        close it (or leave its ``with`` block) to free it at once."""
        return self.hub.subscribe(job_id)

    # -- running -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the loop look for work now (from any thread)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    async def tick(self) -> None:
        """One pass: reap expired jobs, start due schedules, claim queued jobs."""
        await self.reaper.reap()
        await asyncio.to_thread(self.scheduler.tick)
        room = self.settings.max_running - len(self._tasks)
        if room <= 0:
            return
        page = await asyncio.to_thread(
            self.store.jobs, statuses=["queued"], limit=room, oldest_first=True
        )
        for queued in page.rows:
            if kind_for(queued.kind).parked:
                # start() parks it at once; one still queued after a while lost its starter.
                if self.clock.time() - queued.created_at > 5.0:
                    await asyncio.to_thread(self.authorizations.park, queued)
                continue
            lease = await asyncio.to_thread(
                self.store.claim_job, queued.id, self.owner, self.settings.lease_seconds
            )
            row = None if lease is None else await asyncio.to_thread(self.store.job, queued.id)
            if lease is not None and row is not None:
                self._spawn(lease, row)

    async def run(self) -> None:
        """Run this instance's jobs until :meth:`stop` (or until cancelled). Jobs still
        running then are left to their leases: another instance (or this one, restarted)
        takes them over once the leases expire."""
        self._loop = asyncio.get_running_loop()
        self._wake, self._stop = asyncio.Event(), asyncio.Event()
        try:
            while not self._stop.is_set():
                try:
                    await self.tick()
                except Exception:  # a failing store must not end the loop: try again
                    logger.exception("job loop pass failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
                self._wake.clear()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._loop = None

    def stop(self) -> None:
        """Ask :meth:`run` to end (from any thread)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

    def start_background(self) -> None:
        """Run :meth:`run` in a daemon thread with its own event loop."""
        ready = threading.Event()

        async def main() -> None:
            task = asyncio.ensure_future(self.run())
            await asyncio.sleep(0)
            ready.set()
            await task

        self._thread = threading.Thread(
            target=asyncio.run, args=(main(),), name="tokenbroker-jobs", daemon=True
        )
        self._thread.start()
        ready.wait(10)

    def stop_background(self, timeout: float = 10.0) -> None:
        """Stop the background thread and wait for it (at most ``timeout`` seconds)."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _spawn(self, lease: JobLease, row: JobRow) -> None:
        task = asyncio.ensure_future(self.runner.run(lease, row))
        self._tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._tasks.discard(finished)
            self.wake()

        task.add_done_callback(done)
