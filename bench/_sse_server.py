"""The servers of ``sse.py``: a bare sse-starlette endpoint and tokenbroker's job stream.

``python _sse_server.py MODE PORT JOBS`` serves on 127.0.0.1:PORT, one uvicorn worker
(uvloop, httptools, log level warning, no access log), until terminated. Both modes have
``JOBS`` event channels; channel ``j`` publishes one event a second, at ``j / JOBS`` of
each second (so the streams of different jobs are not all served in the same instant, as
real jobs are not), carrying ``{"ts": <time.time() at publishing>}``; ``GET /stream/{j}``
follows channel ``j``:

* ``bare``: an ``EventSourceResponse`` over the thinnest generator: it awaits the
  channel's next publication (one shared future per channel) and yields a
  ``ServerSentEvent`` with a counter id; sse-starlette's own ping (a comment) every 5 s.
  Nothing else: no store, no Last-Event-ID, no gauge.
* ``ours``: the real job stream path. ``JOBS`` queued ``warm`` jobs in a
  :class:`~tokenbroker.jobs.service.JobService` on the memory store; each publication
  appends a ``phase_update`` event to the job in the store and notifies the service's
  hub, as the job runner does. ``GET /stream/{j}`` is what ``GET /v1/jobs/{id}/stream``
  does after authentication: :func:`~tokenbroker.api.sse.event_stream` over a
  :class:`~tokenbroker.api.job_events.JobEventSource` (one feed per job, Last-Event-ID,
  a ``heartbeat {job_id, status, ts}`` every 5 s, lifetime deadline, stream gauge).
  ``GET /gauge`` answers the open streams, stream subscriptions, feeds and hub
  subscriptions.

Publishing starts with ``POST /start`` (the bench sends it once every stream is open, so
no stream opens with a backlog to replay). The ``ts`` lets the client measure
publish-to-arrival latency (one host's clock). The soft ``RLIMIT_NOFILE`` is raised to
the hard limit first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tokenbroker import Broker, parse_settings
from tokenbroker.api.job_events import JobEventSource, JobFeeds
from tokenbroker.api.sse import StreamGauge, StreamLimits, event_stream
from tokenbroker.jobs.service import JobService

PERIOD = 1.0
HEARTBEAT = 5.0


def raise_descriptor_limit() -> None:
    """Raise the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: Set by ``POST /start``: publishing waits for it, so streams open on empty jobs.
STARTED = asyncio.Event()


async def publish_forever(jobs: int, publish: Callable[[int, int], Awaitable[None] | None]) -> None:
    """Call ``publish(j, k)`` for the k-th publication of channel j, on a fixed schedule
    from ``POST /start`` on."""
    await STARTED.wait()
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def channel(j: int) -> None:
        k = 0
        while True:
            k += 1
            await asyncio.sleep(max(0.0, start + k * PERIOD + j * PERIOD / jobs - loop.time()))
            result = publish(j, k)
            if result is not None:
                await result

    await asyncio.gather(*(channel(j) for j in range(jobs)))


class Bare:
    """Channels as one ``asyncio.Event`` each, replaced at every publication."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.next = [asyncio.Event() for _ in range(jobs)]
        self.data = [""] * jobs

    async def run(self) -> None:
        def publish(j: int, k: int) -> None:
            done, self.next[j] = self.next[j], asyncio.Event()
            self.data[j] = json.dumps({"ts": time.time()})
            done.set()

        await publish_forever(self.jobs, publish)

    async def stream(self, request: Request) -> Response:
        j = int(request.path_params["j"])

        async def ticks() -> AsyncIterator[ServerSentEvent]:
            seq = 0
            while True:
                await self.next[j].wait()
                seq += 1
                yield ServerSentEvent(self.data[j], id=str(seq), event="tick")

        return EventSourceResponse(ticks(), ping=HEARTBEAT)

    def gauge(self) -> dict[str, int]:
        return {"open": 0}


class Ours:
    """``JOBS`` queued jobs of a JobService on the memory store, streamed as the API does."""

    def __init__(self, jobs: int) -> None:
        providers = {
            f"p{j}": {
                "grant": "client_credentials",
                "token_url": "http://127.0.0.1:9/token",  # never called: the jobs stay queued
                "client_id": "bench",
                "client_secret": "bench-secret",
            }
            for j in range(jobs)
        }
        text = json.dumps(
            {
                "store": "memory",
                "providers": providers,
                "jobs": {"max_queued": max(jobs, 16), "heartbeat_seconds": HEARTBEAT},
            }
        )
        self.service = JobService(Broker(parse_settings(text, {})))
        self.ids = [
            self.service.start("warm", {"provider": f"p{j}"}, f"bench{j}")[0].job_id
            for j in range(jobs)
        ]
        self.jobs = jobs
        self.feeds: JobFeeds | None = None
        self.limits = StreamLimits(heartbeat_seconds=HEARTBEAT, max_lifetime_seconds=3600)
        self.streams = StreamGauge()

    async def run(self) -> None:
        store, hub = self.service.store, self.service.hub
        self.feeds = JobFeeds(self.service, self.service.settings.poll_seconds)

        def append(job_id: str, k: int) -> None:
            data = {"job_id": job_id, "phase": "fetch", "progress": k % 100, "ts": time.time()}
            store.append_job_event(job_id, "phase_update", json.dumps(data))

        async def publish(j: int, k: int) -> None:
            # A worker thread, as the job runner's saves are.
            await asyncio.to_thread(append, self.ids[j], k)
            hub.notify(self.ids[j])

        await publish_forever(self.jobs, publish)

    async def stream(self, request: Request) -> Response:
        assert self.feeds is not None
        source = JobEventSource(self.feeds, self.ids[int(request.path_params["j"])])
        return await event_stream(
            request, source, limits=self.limits, gauge=self.streams, heartbeat=source.heartbeat
        )

    def gauge(self) -> dict[str, int]:
        feeds = self.feeds
        return {
            "open": self.streams.open,
            "subscriptions": feeds.streams if feeds else 0,
            "feeds": len(feeds) if feeds else 0,
            "hub": len(self.service.hub),
        }


def main() -> None:
    mode, port, jobs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    raise_descriptor_limit()
    server: Any = Bare(jobs) if mode == "bare" else Ours(jobs)

    async def gauge(request: Request) -> Response:
        return JSONResponse(server.gauge())

    async def start(request: Request) -> Response:
        STARTED.set()
        return JSONResponse({"started": True})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(server.run())
        task.add_done_callback(
            lambda t: t.cancelled() or print(f"publisher died: {t.exception()!r}")
        )
        yield
        task.cancel()

    routes = [
        Route("/stream/{j:int}", server.stream),
        Route("/gauge", gauge),
        Route("/start", start, methods=["POST"]),
    ]
    uvicorn.run(
        Starlette(routes=routes, lifespan=lifespan),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        server_header=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
