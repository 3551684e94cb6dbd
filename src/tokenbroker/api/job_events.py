"""A job's stored events as an :class:`~tokenbroker.api.sse.EventSource`, fanned out from one
reader per job.

The job service stores a job's events with every save and wakes the job's subscribers
(:class:`~tokenbroker.jobs.subscriptions.SubscriptionHub`); a wake-up says "something
changed", never what. Every stream of a job in this process shares one :class:`JobFeed`:
one hub subscription, one task that waits for a wake-up (or ``poll_seconds``, for writes
by another process on the same store), reads the store once after the newest sequence it
has seen, frames each new event once, and hands it to every stream of the job. So 5,000
streams of one job cost one store read per change and one poll per ``poll_seconds``, not
5,000 of each (before this, every stream polled the store through a worker thread every
second, and serialised every event itself).

No event is lost. A stream subscribes (attaches to the feed) before it reads its backlog.
Every store read through the feed — the feed's own and each stream's backlog read —
hands the events above the feed's newest sequence to every attached stream before that
sequence moves, so a stream gets every event above the sequence the feed had when it
attached, and its backlog read (which starts after attaching) covers the rest. The
stream's own de-duplication drops what arrives twice.

Store reads run in worker threads, so a slow store never blocks the event loop. A feed
lives while a stream of its job is open: the last :meth:`JobSubscription.close` stops its
task and frees its hub subscription at once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..jobs.document import StoredEvent
from ..jobs.events import sse_frame
from ..jobs.model import JobStatus, iso8601
from ..jobs.service import JobService

__all__ = ["FramedEvent", "JobEventSource", "JobFeed", "JobFeeds", "JobSubscription"]

logger = logging.getLogger("tokenbroker.api.job_events")


@dataclass(frozen=True, slots=True)
class FramedEvent:
    """A stored event with its SSE message built once for every stream."""

    seq: int
    final: bool
    frame: str

    def to_sse(self) -> str:
        """The event as one SSE message with ``id: seq``."""
        return self.frame


class JobSubscription:
    """One stream's live events of one job (see the module docstring).

    Args:
        feed: The job's feed.
        wake: Called (on the loop's thread) when an event can be popped.
    """

    __slots__ = ("_feed", "_pending", "_wake", "floor")

    def __init__(self, feed: JobFeed, wake: Callable[[], None]) -> None:
        self._feed = feed
        self._wake = wake
        self._pending: collections.deque[FramedEvent] = collections.deque()
        #: Events at or below this sequence are not handed over (the stream has them).
        self.floor = 0

    def __repr__(self) -> str:
        return f"JobSubscription(job_id={self._feed.job_id!r}, pending={len(self._pending)})"

    def _push(self, event: FramedEvent) -> None:
        if event.seq > self.floor:
            self._pending.append(event)
            self._wake()

    def pop(self) -> FramedEvent | None:
        """The oldest event handed over and not yet taken, or None."""
        return self._pending.popleft() if self._pending else None

    def close(self) -> None:
        """Detach from the feed at once (idempotent)."""
        self._feed._detach(self)


class JobFeed:
    """The one reader of a job's events in this process, for every stream of the job.

    Args:
        feeds: The registry it belongs to.
        job_id: The job.
    """

    def __init__(self, feeds: JobFeeds, job_id: str) -> None:
        self._feeds = feeds
        self.job_id = job_id
        self.subscriptions: set[JobSubscription] = set()
        #: The newest sequence read so far (every attached stream has been handed the
        #: events above the value it had when the stream attached).
        self.seen = 0
        #: The job's status as last read (for heartbeats).
        self.status = JobStatus.QUEUED
        self._wakeup = feeds.service.subscribe(job_id)
        self._task = asyncio.get_running_loop().create_task(self._follow())

    def __repr__(self) -> str:
        return (
            f"JobFeed(job_id={self.job_id!r}, streams={len(self.subscriptions)}, seen={self.seen})"
        )

    async def read(self, last_id: int) -> list[FramedEvent]:
        """The stored events after ``last_id`` (a worker-thread store read); those above
        :attr:`seen` are handed to every attached stream first."""
        stored = await asyncio.to_thread(self._feeds.service.events, self.job_id, last_id)
        return self._took(stored)

    def _took(self, stored: list[StoredEvent]) -> list[FramedEvent]:
        framed = [_framed(e) for e in stored]
        fresh = [e for e in framed if e.seq > self.seen]
        if fresh:
            self.seen = fresh[-1].seq
            last = stored[-1]
            if last.final and isinstance(last.data.get("status"), str):
                self.status = JobStatus(last.data["status"])
            elif last.name == "phase_update":
                self.status = JobStatus.RUNNING
            for subscription in tuple(self.subscriptions):
                for event in fresh:
                    subscription._push(event)
        return framed

    async def _follow(self) -> None:
        poll = self._feeds.poll_seconds
        while True:
            await self._wakeup.wait(poll)
            try:
                await self.read(self.seen)
            except Exception:  # the store is down: keep waiting, streams keep their heartbeats
                logger.warning("reading the events of job %s failed", self.job_id, exc_info=True)

    def _attach(self, wake: Callable[[], None]) -> JobSubscription:
        subscription = JobSubscription(self, wake)
        self.subscriptions.add(subscription)
        return subscription

    def _detach(self, subscription: JobSubscription) -> None:
        self.subscriptions.discard(subscription)
        if not self.subscriptions and self._feeds._feeds.get(self.job_id) is self:
            del self._feeds._feeds[self.job_id]
            self._task.cancel()
            self._wakeup.close()


class JobFeeds:
    """The feeds of one process's job streams, by job (one per job with an open stream).

    Args:
        service: The job service.
        poll_seconds: The longest a feed waits without a wake-up before it looks at the
            store again (writes by other processes on the same store wake nobody).
    """

    def __init__(self, service: JobService, poll_seconds: float = 1.0) -> None:
        self.service = service
        self.poll_seconds = poll_seconds
        self._feeds: dict[str, JobFeed] = {}

    def __repr__(self) -> str:
        return f"JobFeeds(jobs={len(self._feeds)}, streams={self.streams})"

    def __len__(self) -> int:
        """Jobs with at least one open stream."""
        return len(self._feeds)

    @property
    def streams(self) -> int:
        """Open stream subscriptions over every job."""
        return sum(len(f.subscriptions) for f in self._feeds.values())

    def feed(self, job_id: str) -> JobFeed:
        """The job's feed, started on first use (call inside the running event loop)."""
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = JobFeed(self, job_id)
        return feed


class JobEventSource:
    """One job's events for one stream request (already authorised for the caller).

    Args:
        feeds: The process's job feeds.
        job_id: The job (known to exist).
    """

    def __init__(self, feeds: JobFeeds, job_id: str) -> None:
        self.feeds = feeds
        self.job_id = job_id
        self._status = JobStatus.QUEUED
        self._feed: JobFeed | None = None
        self._subscription: JobSubscription | None = None

    def __repr__(self) -> str:
        return f"JobEventSource(job_id={self.job_id!r})"

    @property
    def status(self) -> JobStatus:
        """The job's status as last read (for heartbeats)."""
        return self._feed.status if self._feed is not None else self._status

    def subscribe(self, wake: Callable[[], None]) -> JobSubscription:
        """Follow the job's events from now on (call inside the running event loop)."""
        feed = self._feed = self.feeds.feed(self.job_id)
        if feed.seen == 0:  # nothing read yet: the status this request read is the newest
            feed.status = self._status
        self._subscription = feed._attach(wake)
        return self._subscription

    async def after(self, last_id: int) -> Sequence[FramedEvent]:
        """The stored events with ``seq > last_id``, in order."""
        if self._feed is None:
            stored = await asyncio.to_thread(self.feeds.service.events, self.job_id, last_id)
            return [_framed(e) for e in stored]
        events = await self._feed.read(last_id)
        if events and self._subscription is not None:
            self._subscription.floor = max(self._subscription.floor, events[-1].seq)
        return events

    async def delivered(self, last_id: int) -> bool:
        """True when the job has ended and ``last_id`` is at or past its final event."""
        job = await asyncio.to_thread(self.feeds.service.get, self.job_id)
        if job is None:
            return False
        self._status = job.status
        if not job.status.final:
            return False
        return not await self.after(last_id)

    def heartbeat(self, last_id: int) -> str:
        """The ``heartbeat`` message ``{job_id, status, ts}`` with the id of the last event
        the stream has sent (none before the first)."""
        data = {"job_id": self.job_id, "status": self.status.value, "ts": iso8601(time.time())}
        return sse_frame("heartbeat", json.dumps(data, separators=(",", ":")), last_id or None)


def _framed(event: StoredEvent) -> FramedEvent:
    return FramedEvent(event.seq, event.final, event.to_sse())
