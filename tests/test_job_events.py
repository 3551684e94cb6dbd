"""api/job_events.py: every stream of a job is fed by one reader of the store, served for real."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from support import wait_for
from tokenbroker import Broker, parse_settings
from tokenbroker.api.job_events import JobEventSource, JobFeeds
from tokenbroker.api.sse import StreamGauge, StreamLimits, event_stream
from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.secret import Secret
from tokenbroker.jobs.service import JobService
from tokenbroker.store.memory import MemoryStore
from tokenbroker.testing.asgi import ServedApp

STREAMS = 60


class CountingStore(MemoryStore):
    """The memory store, counting reads of job events (the only thing a stream reads)."""

    def __init__(self) -> None:
        super().__init__(Keyring([Secret(generate_key())]))
        self.event_reads = 0
        self._count_lock = threading.Lock()

    def job_events(self, job_id: str, after: int = 0, limit: int | None = None) -> Any:
        with self._count_lock:
            self.event_reads += 1
        return (
            super().job_events(job_id, after)
            if limit is None
            else super().job_events(job_id, after, limit)
        )


class Stage:
    """A served app streaming one queued job as ``GET /v1/jobs/{id}/stream`` does, and a
    route that appends an event to it the way the runner does (store, then notify)."""

    def __init__(self, poll_seconds: float = 30) -> None:
        self.store = CountingStore()
        settings = parse_settings(
            json.dumps(
                {
                    "store": "memory",
                    "providers": {
                        "p": {
                            "grant": "client_credentials",
                            "token_url": "http://127.0.0.1:9/token",  # never called
                            "client_id": "c",
                            "client_secret": "s",
                        }
                    },
                }
            ),
            {},
        )
        self.service = JobService(Broker(settings, store=self.store))
        self.job_id = self.service.start("warm", {"provider": "p"}, "ops")[0].job_id
        self.gauge = StreamGauge()
        limits = StreamLimits(heartbeat_seconds=30, max_lifetime_seconds=60)
        holder: dict[str, JobFeeds] = {}

        async def stream(request: Request) -> Response:
            feeds = holder.setdefault("feeds", JobFeeds(self.service, poll_seconds=poll_seconds))
            source = JobEventSource(feeds, self.job_id)
            return await event_stream(request, source, limits=limits, gauge=self.gauge)

        async def publish(request: Request) -> Response:
            data = json.dumps({"job_id": self.job_id, "phase": "fetch", "progress": 1})
            seq = await asyncio.to_thread(
                self.store.append_job_event, self.job_id, "phase_update", data
            )
            if request.query_params.get("notify") != "no":  # "no": another process wrote it
                self.service.hub.notify(self.job_id)
            return JSONResponse({"seq": seq})

        self.holder = holder
        routes = [Route("/stream", stream), Route("/publish", publish, methods=["POST"])]
        self.served = ServedApp(Starlette(routes=routes)).start()
        self.port = int(self.served.url.rsplit(":", 1)[1])

    def close(self) -> None:
        self.served.stop()


@pytest.fixture
def stage(request: pytest.FixtureRequest) -> Iterator[Stage]:
    staged = Stage(getattr(request, "param", 30))
    yield staged
    staged.close()


async def _follow(port: int, count: int, want: int, ready: list[int]) -> list[list[int]]:
    """Open ``count`` raw streams; return the event ids each got, once each has ``want``.
    A stream counts as ready once it has its backlog (event 1)."""

    async def one() -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        ids: list[int] = []
        buffer = b""
        while len(ids) < want:
            buffer += await reader.read(65536)
            *lines, buffer = buffer.split(b"\n")
            ids += [int(line[4:]) for line in lines if line.startswith(b"id: ")]
            if ids == [1]:
                ready.append(1)
        writer.close()
        return ids

    return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 60)


def test_streams_of_one_job_share_one_store_reader(stage: Stage) -> None:
    """60 streams of one job each get every event exactly once, in order, while each
    published event costs one store read for all of them (not one per stream), through
    one hub subscription; when they close, the feed and its subscription are freed."""
    httpx.post(f"{stage.served.url}/publish", timeout=10)
    ready: list[int] = []
    reads_before: list[int] = []

    async def main() -> list[list[int]]:
        followers = asyncio.ensure_future(_follow(stage.port, STREAMS, 4, ready))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(ready) < STREAMS:  # every stream has read its backlog
            assert loop.time() < deadline, len(ready)
            await asyncio.sleep(0.02)
        feeds = stage.holder["feeds"]
        assert (len(feeds), feeds.streams, len(stage.service.hub)) == (1, STREAMS, 1)
        reads_before.append(stage.store.event_reads)
        async with httpx.AsyncClient(base_url=stage.served.url, timeout=10) as client:
            for _ in range(3):
                await client.post("/publish")
        return await followers

    got = asyncio.run(main())
    assert all(ids == [1, 2, 3, 4] for ids in got), got[:3]
    live_reads = stage.store.event_reads - reads_before[0]
    assert live_reads <= 6, live_reads  # 3 events: one read each (two spare), not 3 x 60
    wait_for(lambda: stage.gauge.open == 0, "every stream closed", 10)
    feeds = stage.holder["feeds"]
    assert (len(feeds), feeds.streams, len(stage.service.hub)) == (0, 0, 0)


@pytest.mark.parametrize("stage", [0.1], indirect=True, ids=["poll 0.1 s"])
def test_a_write_nobody_notified_is_found_by_one_poll_per_job(stage: Stage) -> None:
    """An event stored without a wake-up (another process's write) reaches all 20 streams
    of the job through the feed's poll; polling costs one store read per poll interval for
    the job, not one per stream."""
    httpx.post(f"{stage.served.url}/publish", timeout=10)
    ready: list[int] = []
    reads: list[float] = []

    async def main() -> list[list[int]]:
        followers = asyncio.ensure_future(_follow(stage.port, 20, 2, ready))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(ready) < 20:
            assert loop.time() < deadline, len(ready)
            await asyncio.sleep(0.02)
        before, started = stage.store.event_reads, loop.time()
        await asyncio.sleep(1.0)  # idle: only the feed's polls read
        reads.append((stage.store.event_reads - before) / (loop.time() - started))
        async with httpx.AsyncClient(base_url=stage.served.url, timeout=10) as client:
            await client.post("/publish", params={"notify": "no"})
        return await followers

    got = asyncio.run(main())
    assert all(ids == [1, 2] for ids in got), got[:3]
    assert reads[0] <= 12, reads  # about 10 polls a second for the job, not 20 x 10
