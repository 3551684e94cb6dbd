"""The broker's status as a compacted, coalesced event log: the source of ``GET /v1/events``.

Items are the things the status page shows a row for: ``provider:NAME``, ``pool:PREFIX``,
``job:ID`` and ``service``. Each event carries one item's whole current state (what
:mod:`tokenbroker.api.ui.views` renders; never a token, secret or key), so a reader only
ever replaces a row. The feed keeps each item's *latest* event only (a compacted log):
:meth:`StatusFeed.after` ``(N)`` is the newest state of every item that changed after event
``N``, so ``after(0)`` is the full current state and a reconnect with ``Last-Event-ID`` gets
exactly what it missed, coalesced.

What wakes it: the broker's event bus (token refreshed / failed / reauthorization required,
job lifecycle events the runner emits, pool lease grants), the job service's all-jobs
wake-up (a job queued, canceled, updated by this process), and a one-second tick while
anyone listens (other processes on the same store, pool counts). Each wake-up takes a
snapshot and diffs it against the last state sent per item. Coalescing: an item is sent at
most once per :data:`COALESCE_SECONDS`; a change inside that window is sent when it ends
(the latest state, never a stale one).

Threads: bus events arrive on any thread and only set a flag with
``call_soon_threadsafe``; snapshots that read the store run in a worker thread; everything
else happens on the event loop the feed was started on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.events import Event, TokenAcquired, TokenRequestFailed
from ..jobs.events import sse_frame
from .ui.views import Snapshot

__all__ = ["COALESCE_SECONDS", "FeedEvent", "FeedSubscription", "StatusFeed"]

logger = logging.getLogger("tokenbroker.api.status_feed")

#: An item is sent at most once per this many seconds.
COALESCE_SECONDS = 1.0
#: Seconds between snapshots while someone listens and nothing wakes the feed.
TICK_SECONDS = 1.0
#: Finished jobs kept in the log (the newest); older ones leave it.
KEPT_JOBS = 50


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One item's state at one moment (an SSE event named for the item's kind).

    Attributes:
        seq: Its place in the feed (1, 2, 3, …).
        item: ``provider:NAME``, ``pool:PREFIX``, ``job:ID`` or ``service``.
        data: The item's state (JSON values, never a secret).
    """

    seq: int
    item: str
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        """Never: the feed does not end."""
        return False

    def to_sse(self) -> str:
        """``event: provider|pool|job|service``, ``id: seq``, ``data: {"item": …, …}``."""
        kind = self.item.partition(":")[0]
        body = json.dumps({"item": self.item, **self.data}, separators=(",", ":"))
        return sse_frame(kind, body, self.seq)


class FeedSubscription:
    """The feed's events from now on, for one stream (the push-based
    :class:`tokenbroker.api.sse.Subscription`: queued, then ``wake`` is called)."""

    def __init__(self, feed: StatusFeed, wake: Callable[[], None]) -> None:
        self._feed = feed
        self._wake = wake
        self.queue: collections.deque[FeedEvent] = collections.deque(maxlen=1000)

    def pop(self) -> FeedEvent | None:
        """The oldest event not yet taken, or None."""
        return self.queue.popleft() if self.queue else None

    def close(self) -> None:
        """Stop receiving (idempotent)."""
        self._feed._subscribers.discard(self)

    def offer(self, event: FeedEvent) -> None:
        """Queue ``event`` and wake the stream; a reader that fell 1,000 events behind loses
        the oldest, and the stream re-reads the log when it sees the gap in the ids."""
        self.queue.append(event)
        self._wake()


class StatusFeed:
    """The broker's coalesced status events (see the module docstring).

    Args:
        snapshot: Takes the current state of every item (blocking; run in a worker thread).
        subscribe_bus: Subscribes a callable to the broker's events; returns the unsubscriber.
        job_wakeup: Opens the job service's all-jobs wake-up (needs the running loop).
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        subscribe_bus: Callable[[Callable[[Event], None]], Callable[[], None]],
        job_wakeup: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot = snapshot
        self._subscribe_bus = subscribe_bus
        self._job_wakeup = job_wakeup
        self._clock = clock
        self._subscribers: set[FeedSubscription] = set()
        self._latest: dict[str, FeedEvent] = {}
        self._sent_at: dict[str, float] = {}
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Future[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        #: Per provider, the code of the last failure since its last success (bus events).
        self.last_codes: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"StatusFeed(seq={self._seq}, items={len(self._latest)})"

    # -- the EventSource protocol of tokenbroker.api.sse --------------------------------

    def subscribe(self, wake: Callable[[], None]) -> FeedSubscription:
        """Follow the feed from now on (starts it on the running loop if needed); ``wake``
        is called whenever an event can be popped."""
        self.start()
        subscription = FeedSubscription(self, wake)
        self._subscribers.add(subscription)
        self.poke()
        return subscription

    async def after(self, last_id: int) -> Sequence[FeedEvent]:
        """The newest state of every item that changed after ``last_id``, in order."""
        if self._seq == 0:
            await self.refresh()
        return sorted((e for e in self._latest.values() if e.seq > last_id), key=_seq)

    async def delivered(self, last_id: int) -> bool:
        """Never: the feed does not end."""
        return False

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Start following the broker on the running event loop (idempotent)."""
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._unsubscribe = self._subscribe_bus(self._on_event)
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop following (the app's shutdown)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        """Take a snapshot soon (thread-safe)."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(wake.set)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TokenRequestFailed):
            self.last_codes[event.provider] = event.code
        elif isinstance(event, TokenAcquired):
            self.last_codes.pop(event.provider, None)
        self.poke()

    async def _run(self) -> None:
        assert self._wake is not None
        wakeup = None
        watcher = None
        if self._job_wakeup is not None:
            wakeup = self._job_wakeup()
            watcher = asyncio.ensure_future(self._watch_jobs(wakeup))
        try:
            while True:
                wait = TICK_SECONDS if self._subscribers else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                self._wake.clear()
                try:
                    due = await self.refresh()
                except Exception as exc:  # a store outage must not end the feed
                    logger.warning("status snapshot failed: %s", type(exc).__name__)
                    due = TICK_SECONDS
                if due is not None:
                    await asyncio.sleep(due)
                    self._wake.set()
        finally:
            if watcher is not None:
                watcher.cancel()
            if wakeup is not None:
                wakeup.close()

    async def _watch_jobs(self, wakeup: Any) -> None:
        while True:
            await wakeup.wait(None)
            self.poke()

    async def refresh(self) -> float | None:
        """Take a snapshot and publish the items that changed (coalesced).

        Returns:
            Seconds until a held-back change is due, or None when nothing is held back.
        """
        snap = await asyncio.to_thread(self._snapshot)
        now = self._clock()
        held: float | None = None
        for item, data in snap.items.items():
            previous = self._latest.get(item)
            if previous is not None and previous.data == data:
                continue
            since = now - self._sent_at.get(item, -COALESCE_SECONDS)
            if since < COALESCE_SECONDS:
                left = COALESCE_SECONDS - since
                held = left if held is None else min(held, left)
                continue
            self._publish(item, data, now)
        self._forget(snap)
        return held

    def _publish(self, item: str, data: dict[str, Any], now: float) -> None:
        self._seq += 1
        event = FeedEvent(self._seq, item, data)
        self._latest[item] = event
        self._sent_at[item] = now
        for subscription in list(self._subscribers):
            subscription.offer(event)

    def _forget(self, snap: Snapshot) -> None:
        """Drop jobs that left the snapshot (the log keeps :data:`KEPT_JOBS` at most)."""
        gone = [i for i in self._latest if i.startswith("job:") and i not in snap.items]
        for item in gone:
            del self._latest[item]
            self._sent_at.pop(item, None)


def _seq(event: FeedEvent) -> int:
    return event.seq
