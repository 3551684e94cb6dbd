"""Server-Sent Events for any replayable event source: resume, heartbeats, bounded lifetime.

:func:`event_stream` turns an :class:`EventSource` (a job's events, the broker's status
events, …) into an sse-starlette response (FastAPI's own SSE response left generators
unfinalised after disconnects). The wire contract (WHATWG HTML "Server-sent events"):

- Every event carries ``id:`` = its sequence number in the source (1, 2, 3, …). A request
  with ``Last-Event-ID: N`` gets exactly the events after N, then the live ones.
- A named ``heartbeat`` event every ``heartbeat_seconds`` (default 5, below proxies' idle
  timeouts). It carries the id of the last event *this stream has sent*, so a reconnect
  after it misses nothing.
- The source's final event ends the stream. A request for a finished source whose final
  event the client already has is answered ``204`` (the documented way to stop an
  ``EventSource`` reconnecting).
- After ``max_lifetime_seconds`` the stream ends with a ``retry:`` hint; the client
  reconnects with ``Last-Event-ID``. This, not sse-starlette's ``send_timeout`` (which
  fires only after megabytes sit in kernel buffers), is what finds a frozen client.
- ``Cache-Control: no-store`` and ``X-Accel-Buffering: no`` (nginx would otherwise buffer
  and gzip the stream until its end).

Ordering without loss: the stream subscribes first, then reads the stored events after
``Last-Event-ID``, then follows the subscription, dropping ids it has already sent. An
event stored between the subscription and the read arrives through one or both and is
sent once. A live event whose id jumps past the next expected one (a subscriber that lost
messages, e.g. Redis pub/sub across a reconnect) makes the stream re-read the store.

Cost per stream: no task or timer of its own beyond sse-starlette's sender and listeners.
The generator awaits one future, resolved by its source when an event can be popped
(:class:`Subscription` is push-based) or by the loop's one
:class:`~.stream_clock.StreamClock` when a heartbeat or the end of its life is due;
sse-starlette's ping task is off (``ping=0``) since the generator sends the heartbeats.

Resources: the subscription is taken *inside* the response's generator and released in
its ``finally`` (a resource taken outside and released inside leaks when the generator
never starts: sse-starlette#156), so a client that disconnects frees it at once.
Everything that can refuse a request (authentication, an unknown id → 404, a malformed
``Last-Event-ID`` → 400, a delivered stream → 204) is decided before the response starts:
an exception inside the generator would give ``200`` and an empty stream, which
``EventSource`` retries for ever.

:class:`StreamGauge` counts the open streams for ``tokenbroker_sse_streams`` without this
module knowing about Prometheus: the metrics module reads :attr:`StreamGauge.open` or
passes a listener.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.requests import Request
from starlette.responses import Response

from ..jobs.events import parse_last_event_id, sse_frame
from ..jobs.model import iso8601
from .errors import NO_STORE, InvalidRequest, error_response
from .stream_clock import Waker, clock_for, is_due

__all__ = [
    "EventSource",
    "StreamEvent",
    "StreamGauge",
    "StreamLimits",
    "Subscription",
    "draining",
    "event_stream",
    "heartbeat_frame",
]

logger = logging.getLogger("tokenbroker.api.sse")

#: Headers of every stream answer (sse-starlette sets the same two; stated here as the
#: contract, and for the 204).
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class StreamEvent(Protocol):
    """One stored event of a source (e.g. :class:`tokenbroker.jobs.events.JobEvent`)."""

    @property
    def seq(self) -> int:
        """Its place in the source's sequence: 1, 2, 3, … without gaps."""

    @property
    def final(self) -> bool:
        """True for the event that ends the source's stream."""

    def to_sse(self) -> str:
        """The event as one SSE message with ``id: seq`` (no CR or LF inside a field)."""


class Subscription(Protocol):
    """Live events published after :meth:`EventSource.subscribe` returned, handed over
    without a task or a timer per stream: the source queues an event and calls the
    subscriber's ``wake``; the stream takes it with :meth:`pop`."""

    def pop(self) -> StreamEvent | None:
        """The oldest published event not yet taken, or None (never blocks)."""

    def close(self) -> None:
        """Free the subscription at once (idempotent; never blocks, never raises)."""


class EventSource(Protocol):
    """A replayable, numbered event sequence with live delivery.

    Contract: every event a subscriber receives from :meth:`subscribe` is also readable
    from :meth:`after` from the moment it is published (store first, then publish), so a
    stream that subscribes before it reads loses nothing.
    """

    def subscribe(self, wake: Callable[[], None]) -> Subscription:
        """Start receiving events published from now on; call ``wake`` (on the event
        loop's thread, never blocking) whenever one can be popped."""

    async def after(self, last_id: int) -> Sequence[StreamEvent]:
        """The stored events with ``seq > last_id``, in order."""

    async def delivered(self, last_id: int) -> bool:
        """True when the source has ended and ``last_id`` is at or past its final event."""


#: Builds the heartbeat message from the id of the last event this stream has sent.
HeartbeatFactory = Callable[[int], str]


def heartbeat_frame(last_id: int) -> str:
    """The default heartbeat: ``event: heartbeat``, ``data: {"ts": …}``, ``id:`` of the last
    event sent (none before the first, so the client's Last-Event-ID never moves ahead)."""
    data = json.dumps({"ts": iso8601(time.time())}, separators=(",", ":"))
    return sse_frame("heartbeat", data, last_id or None)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """How one stream behaves over time.

    Attributes:
        heartbeat_seconds: Seconds between ``heartbeat`` events (> 0).
        max_lifetime_seconds: Seconds after which the stream ends with a ``retry:`` hint (> 0).
        retry_ms: The reconnection delay sent in that hint, in milliseconds (>= 0).

    Raises:
        ValueError: For a value out of range.
    """

    heartbeat_seconds: float = 5.0
    max_lifetime_seconds: float = 300.0
    retry_ms: int = 1000

    def __post_init__(self) -> None:
        finite = math.isfinite(self.heartbeat_seconds) and math.isfinite(self.max_lifetime_seconds)
        if not finite or self.heartbeat_seconds <= 0 or self.max_lifetime_seconds <= 0:
            raise ValueError("heartbeat_seconds and max_lifetime_seconds must be > 0")
        if self.retry_ms < 0:
            raise ValueError("retry_ms must be >= 0")


class StreamGauge:
    """The number of open streams (``tokenbroker_sse_streams``), thread-safe.

    Args:
        listener: Called with the new count after every change (e.g. a Prometheus gauge's
            ``set``); it must not raise or block.
    """

    def __init__(self, listener: Callable[[int], None] | None = None) -> None:
        self._open = 0
        self._lock = threading.Lock()
        self._listener = listener

    @property
    def open(self) -> int:
        """Streams whose generator is running now."""
        return self._open

    def _moved(self, delta: int) -> None:
        with self._lock:
            self._open += delta
            count = self._open
        if self._listener is not None:
            self._listener(count)

    def __repr__(self) -> str:
        return f"StreamGauge(open={self._open})"


def draining(stopping: bool) -> None:
    """Tell every open stream of this process that the server is stopping (True), so each
    ends within about half a second and a graceful shutdown does not wait for clients (the
    status page keeps one stream open for as long as it is shown), or that it is not (False,
    once the server has stopped: the flag is process-wide).

    sse-starlette finds uvicorn's own signal handler to learn this by itself; ``serve``
    handles the signals itself, so it says it here.
    """
    AppStatus.should_exit = stopping


class _Sent:
    """The id of the last event a stream's generator knows has been sent."""

    __slots__ = ("last_id",)

    def __init__(self, last_id: int) -> None:
        self.last_id = last_id


async def event_stream(
    request: Request,
    source: EventSource,
    *,
    limits: StreamLimits | None = None,
    gauge: StreamGauge | None = None,
    heartbeat: HeartbeatFactory = heartbeat_frame,
) -> Response:
    """The SSE answer for ``source``, after every check that can refuse the request.

    Call it from a route whose dependencies have already authenticated the caller and
    found ``source`` (answering 401/404 themselves): nothing here raises once the
    response has started.

    Args:
        request: The request (its ``Last-Event-ID`` header is read).
        source: The event source, already authorised for this caller.
        limits: Heartbeat period, maximum lifetime and retry hint.
        gauge: Counts the open streams.
        heartbeat: Builds the heartbeat message from the last id sent.

    Returns:
        ``400`` for a malformed ``Last-Event-ID``; ``204`` when the client already has
        the final event; otherwise a ``text/event-stream`` response.
    """
    limits = limits or StreamLimits()
    try:
        last_id = parse_last_event_id(request.headers.get("last-event-id"))
    except ValueError:
        return error_response(InvalidRequest("Last-Event-ID must be a non-negative integer"))
    if await source.delivered(last_id):
        return Response(status_code=204, headers={**NO_STORE, **STREAM_HEADERS})
    return EventSourceResponse(
        _events(source, _Sent(last_id), limits, gauge, heartbeat),
        headers=STREAM_HEADERS,
        ping=0,  # no ping task per stream: heartbeats come from the generator (the clock)
        sep="\n",
    )


async def _events(
    source: EventSource,
    sent: _Sent,
    limits: StreamLimits,
    gauge: StreamGauge | None,
    heartbeat: HeartbeatFactory,
) -> AsyncIterator[bytes]:
    """The stream body: the backlog after ``sent.last_id``, then live events and
    heartbeats, then the end (the final event, or ``retry:`` at the end of its life).

    The generator waits on its :class:`~.stream_clock.Waker` only: the source wakes it for
    an event, the loop's :class:`~.stream_clock.StreamClock` for a heartbeat or the end of
    life. ``sent.last_id`` moves only when the generator is resumed after a ``yield``,
    i.e. once sse-starlette has sent that event, so a heartbeat never claims an unsent id.
    """
    loop = asyncio.get_running_loop()
    clock = clock_for(loop)
    waker = Waker(loop)
    now = loop.time()
    deadline = now + limits.max_lifetime_seconds
    beat = now + limits.heartbeat_seconds
    clock.wake_at(waker, min(beat, deadline))
    subscription = source.subscribe(waker.wake)  # before the backlog read: nothing falls between
    if gauge is not None:
        gauge._moved(1)
    try:
        for event in await source.after(sent.last_id):
            if event.seq <= sent.last_id:
                continue
            yield event.to_sse().encode()
            sent.last_id = event.seq
            if event.final:
                return
        while True:
            now = loop.time()
            if is_due(now, deadline):
                yield f"retry: {limits.retry_ms}\n\n".encode()
                return
            if is_due(now, beat):
                beat = now + limits.heartbeat_seconds
                clock.wake_at(waker, min(beat, deadline))
                yield heartbeat(sent.last_id).encode()
                continue
            live = subscription.pop()
            if live is None:
                await waker.wait()
                continue
            pending: Sequence[StreamEvent] = (live,)
            if live.seq > sent.last_id + 1:
                # The subscription skipped ids: the store has them (it is written first).
                pending = await source.after(sent.last_id)
            for event in pending:
                if event.seq <= sent.last_id:
                    continue  # already sent from the backlog
                yield event.to_sse().encode()
                sent.last_id = event.seq
                if event.final:
                    return
    finally:
        waker.closed = True
        subscription.close()
        if gauge is not None:
            gauge._moved(-1)
