"""One timer per event loop for every open stream's heartbeat and lifetime.

A stream waits for its next event on a bare future (:class:`Waker`), and the same future
is what the :class:`StreamClock` resolves when the stream's next heartbeat or its end of
life is due. So a stream costs no task and no timer handle of its own: with sse-starlette's
ping task and an ``asyncio.timeout`` per wait, 5,000 streams meant about 6,000 timer
arms and cancels a second on one worker (bench/sse.py). Here the loop holds one timer,
armed for the earliest due time; due times are rounded up to :data:`GRAIN` seconds so
streams opened close together share one firing.

A wake-up is a hint, never a promise: the stream re-checks the time and its subscription
after every wake-up, and before every wait, so a wake-up that lands while the stream is
busy sending is not needed and may be dropped.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref

__all__ = ["GRAIN", "SLACK", "StreamClock", "Waker", "clock_for", "is_due"]

#: Seconds: due times are rounded up to a multiple of this (one firing serves them all).
GRAIN = 0.05
#: Seconds a timer may fire early (the loop's clock resolution); a time this close is due.
SLACK = 0.005


def is_due(now: float, when: float) -> bool:
    """True when loop time ``when`` has come at ``now`` (within :data:`SLACK`): whatever
    the clock wakes for :meth:`StreamClock.wake_at` is due by this test."""
    return now + SLACK >= when


class Waker:
    """The one thing a stream awaits: woken by its source (an event can be popped) or by
    the clock (a heartbeat or the end of its life is due).

    Args:
        loop: The stream's event loop; :meth:`wake` must be called on its thread.
    """

    __slots__ = ("__weakref__", "_future", "_loop", "closed")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None
        self.closed = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "waiting" if self._future else "running"
        return f"Waker({state})"

    def wake(self) -> None:
        """Resume the stream if it is waiting (otherwise nothing: it re-checks anyway)."""
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self) -> None:
        """Wait for the next :meth:`wake` (cancellable)."""
        self._future = self._loop.create_future()
        try:
            await self._future
        finally:
            self._future = None


class StreamClock:
    """Wakes registered :class:`Waker` objects at their due times, with one loop timer.

    Args:
        loop: The event loop whose streams it serves.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: list[tuple[float, int, weakref.ref[Waker]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    def __repr__(self) -> str:
        return f"StreamClock(pending={len(self._due)}, armed_for={self._armed_for})"

    def __len__(self) -> int:
        """Pending due times (a closed stream's last one stays until it passes)."""
        return len(self._due)

    def wake_at(self, waker: Waker, when: float) -> None:
        """Wake ``waker`` at loop time ``when`` (rounded up to :data:`GRAIN`), once."""
        when = math.ceil(when / GRAIN) * GRAIN
        heapq.heappush(self._due, (when, next(self._order), weakref.ref(waker)))
        if when < self._armed_for:
            if self._timer is not None:
                self._timer.cancel()
            self._armed_for = when
            self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._armed_for = None, math.inf
        now = self._loop.time()
        due = self._due
        while due and is_due(now, due[0][0]):
            waker = heapq.heappop(due)[2]()
            if waker is not None and not waker.closed:
                waker.wake()
        if due:
            self._armed_for = due[0][0]
            self._timer = self._loop.call_at(self._armed_for, self._fire)


_CLOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamClock] = (
    weakref.WeakKeyDictionary()
)


def clock_for(loop: asyncio.AbstractEventLoop) -> StreamClock:
    """The clock of ``loop`` (created on first use, gone with the loop)."""
    clock = _CLOCKS.get(loop)
    if clock is None:
        clock = _CLOCKS[loop] = StreamClock(loop)
    return clock
