"""The servers of ``sse.py``: a bare sse-starlette endpoint and ``api/sse.py``'s, side by side.

``python _sse_server.py MODE PORT`` serves on 127.0.0.1:PORT, one uvicorn worker (uvloop,
httptools, log level warning, no access log), until terminated:

* ``bare``: ``GET /stream`` is an ``EventSourceResponse`` over a generator that sleeps 1 s
  and yields ``{"ts": <time.time()>}`` with a counter id, pinging every 5 s (the library's
  comment ping). Nothing else.
* ``ours``: ``GET /stream`` is :func:`tokenbroker.api.sse.event_stream` over a per-stream
  source whose subscription produces the same event every second (so each stream has its
  own subscription, taken inside the generator and freed in its ``finally``), with a
  ``heartbeat`` event every 5 s and the open streams counted by a
  :class:`~tokenbroker.api.sse.StreamGauge`; ``GET /gauge`` answers that count.

The event's ``ts`` lets the client measure delivery latency (both on one host's clock).
The soft ``RLIMIT_NOFILE`` is raised to the hard limit first (5,000 streams need more than
the usual 1,024 descriptors).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tokenbroker.api.sse import StreamEvent, StreamGauge, StreamLimits, event_stream
from tokenbroker.jobs.events import sse_frame

PERIOD = 1.0
HEARTBEAT = 5.0


def raise_descriptor_limit() -> None:
    """Raise the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def bare(request: Request) -> Response:
    async def ticks() -> AsyncIterator[ServerSentEvent]:
        seq = 0
        while True:
            await asyncio.sleep(PERIOD)
            seq += 1
            yield ServerSentEvent(json.dumps({"ts": time.time()}), id=str(seq), event="tick")

    return EventSourceResponse(ticks(), ping=HEARTBEAT)


@dataclass(frozen=True, slots=True)
class Tick:
    seq: int
    final: bool = False

    def to_sse(self) -> str:
        return sse_frame("tick", json.dumps({"ts": time.time()}), self.seq)


class TickSubscription:
    def __init__(self, after: int) -> None:
        self.seq = after

    async def get(self) -> StreamEvent:
        await asyncio.sleep(PERIOD)
        self.seq += 1
        return Tick(self.seq)

    def close(self) -> None:
        pass


class TickSource:
    """An endless source with nothing stored: each subscriber gets a tick a second."""

    def __init__(self, last_id: int) -> None:
        self._last_id = last_id

    def subscribe(self) -> TickSubscription:
        return TickSubscription(self._last_id)

    async def after(self, last_id: int) -> Sequence[StreamEvent]:
        return ()

    async def delivered(self, last_id: int) -> bool:
        return False


GAUGE = StreamGauge()
LIMITS = StreamLimits(heartbeat_seconds=HEARTBEAT, max_lifetime_seconds=3600)


async def ours(request: Request) -> Response:
    last = request.headers.get("last-event-id", "")
    source = TickSource(int(last) if last.isdigit() else 0)
    return await event_stream(request, source, limits=LIMITS, gauge=GAUGE)


async def gauge(request: Request) -> Response:
    return JSONResponse({"open": GAUGE.open})


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    raise_descriptor_limit()
    routes = [Route("/stream", bare if mode == "bare" else ours), Route("/gauge", gauge)]
    uvicorn.run(
        Starlette(routes=routes),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        server_header=False,
        backlog=8192,
    )


if __name__ == "__main__":
    main()
