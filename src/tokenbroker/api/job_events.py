"""A job's stored events as an :class:`~tokenbroker.api.sse.EventSource` for the SSE stream.

The job service stores a job's events with every save and wakes the job's subscribers
(:class:`~tokenbroker.jobs.subscriptions.SubscriptionHub`); a wake-up says "something
changed", never what. :class:`JobEventSource` turns that into the source
:func:`~tokenbroker.api.sse.event_stream` wants: :meth:`JobEventSource.after` reads the
store, and a subscription's :meth:`~JobSubscription.get` waits for a wake-up (or
``poll_seconds``, for writes by another process on the same store) and re-reads the store
after the last event it returned. Since the store is written before the wake-up, nothing
published can be missed, and the stream's own de-duplication drops what it already sent.

Store reads run in worker threads, so a slow store never blocks the event loop; a
subscription holds nothing but its wake-up, freed by :meth:`JobSubscription.close`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Sequence

from ..jobs.document import StoredEvent
from ..jobs.events import sse_frame
from ..jobs.model import JobStatus, iso8601
from ..jobs.service import JobService
from ..jobs.subscriptions import Subscription as Wakeup

__all__ = ["JobEventSource", "JobSubscription"]


class JobSubscription:
    """Live events of one job for one stream (see the module docstring).

    Args:
        source: The job's event source.
        wakeup: The job service's wake-up for the job.
    """

    def __init__(self, source: JobEventSource, wakeup: Wakeup) -> None:
        self._source = source
        self._wakeup = wakeup
        self._pending: collections.deque[StoredEvent] = collections.deque()
        self._cursor: int | None = None  # None: start after what the backlog read returned

    def __repr__(self) -> str:
        return f"JobSubscription(job_id={self._source.job_id!r}, cursor={self._cursor})"

    async def get(self) -> StoredEvent:
        """The job's next stored event, waiting for it (cancellable at any time)."""
        while not self._pending:
            if self._cursor is None:
                self._cursor = self._source.seen
            fresh = await self._source.read(self._cursor)
            if fresh:
                self._pending.extend(fresh)
                self._cursor = fresh[-1].seq
                break
            await self._wakeup.wait(self._source.poll_seconds)
        return self._pending.popleft()

    def close(self) -> None:
        """Free the wake-up at once (idempotent)."""
        self._wakeup.close()


class JobEventSource:
    """One job's events for one stream request (already authorised for the caller).

    Args:
        service: The job service.
        job_id: The job (known to exist).
        poll_seconds: The longest a subscription waits without a wake-up before it looks
            at the store again (writes by other processes on the same store wake nobody).
    """

    def __init__(self, service: JobService, job_id: str, poll_seconds: float = 1.0) -> None:
        self.service = service
        self.job_id = job_id
        self.poll_seconds = poll_seconds
        #: The newest sequence number read so far.
        self.seen = 0
        #: The job's status as last read (for heartbeats).
        self.status = JobStatus.QUEUED

    def __repr__(self) -> str:
        return f"JobEventSource(job_id={self.job_id!r}, seen={self.seen})"

    async def read(self, last_id: int) -> list[StoredEvent]:
        """The stored events after ``last_id`` (a worker-thread store read)."""
        events = await asyncio.to_thread(self.service.events, self.job_id, last_id)
        if events:
            self.seen = max(self.seen, events[-1].seq)
            last = events[-1]
            if last.final and isinstance(last.data.get("status"), str):
                self.status = JobStatus(last.data["status"])
            elif last.name == "phase_update":
                self.status = JobStatus.RUNNING
        return events

    def subscribe(self) -> JobSubscription:
        """Follow the job's events from now on (call inside the running event loop)."""
        return JobSubscription(self, self.service.subscribe(self.job_id))

    async def after(self, last_id: int) -> Sequence[StoredEvent]:
        """The stored events with ``seq > last_id``, in order."""
        return await self.read(last_id)

    async def delivered(self, last_id: int) -> bool:
        """True when the job has ended and ``last_id`` is at or past its final event."""
        job = await asyncio.to_thread(self.service.get, self.job_id)
        if job is None:
            return False
        self.status = job.status
        if not job.status.final:
            return False
        return not await self.read(last_id)

    def heartbeat(self, last_id: int) -> str:
        """The ``heartbeat`` message ``{job_id, status, ts}`` with the id of the last event
        the stream has sent (none before the first)."""
        data = {"job_id": self.job_id, "status": self.status.value, "ts": iso8601(time.time())}
        return sse_frame("heartbeat", json.dumps(data, separators=(",", ":")), last_id or None)
