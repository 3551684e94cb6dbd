"""api/sse.py against a real uvicorn server on 127.0.0.1, fed by a small in-test event source."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from sse_support import KEY, NoteSource, stream_app
from support import wait_for
from tokenbroker.api.connection import BoundedHeadProtocol
from tokenbroker.api.sse import StreamGauge, StreamLimits
from tokenbroker.client.sse import EventParser, ServerEvent
from tokenbroker.testing.asgi import ServedApp

AUTH = {"Authorization": f"Bearer {KEY}"}


class Stage:
    """A served stream app with one source, ``a``."""

    def __init__(self, limits: StreamLimits) -> None:
        self.source = NoteSource()
        self.gauge = StreamGauge()
        app, self.seen = stream_app({"a": self.source}, self.gauge, limits)
        self.served = ServedApp(app, http=BoundedHeadProtocol).start()
        self.client = httpx.Client(base_url=self.served.url, timeout=10)

    def publish(self, text: str, final: bool = False, deliver: bool = True) -> int:
        answer = self.client.post(
            "/streams/a/events", json={"text": text, "final": final, "deliver": deliver}
        )
        seq: int = answer.json()["seq"]
        return seq

    def close(self) -> None:
        self.client.close()
        self.served.stop()


@pytest.fixture
def stage(request: pytest.FixtureRequest) -> Iterator[Stage]:
    limits = getattr(request, "param", None) or StreamLimits(max_lifetime_seconds=30)
    staged = Stage(limits)
    yield staged
    staged.close()


def limits(**values: float) -> pytest.MarkDecorator:
    """Run the test on a stage with these :class:`StreamLimits`."""
    return pytest.mark.parametrize("stage", [StreamLimits(**values)], indirect=True, ids=[""])  # type: ignore[arg-type]


def events_of(response: httpx.Response, until: str | None = None) -> Iterator[ServerEvent]:
    """The events of a streamed response, up to the end of the stream."""
    parser = EventParser()
    for chunk in response.iter_text():
        yield from parser.feed(chunk)


def take(stream: Iterator[ServerEvent], count: int, skip_heartbeats: bool = True) -> list[str]:
    """``id:event`` of the next ``count`` events."""
    got: list[str] = []
    for event in stream:
        if skip_heartbeats and event.event == "heartbeat":
            continue
        got.append(f"{event.id}:{event.event}")
        if len(got) == count:
            break
    return got


def test_resume_with_last_event_id_returns_exactly_the_missing_events(stage: Stage) -> None:
    """A request with Last-Event-ID 2 gets events 3.. then the live ones, and the final one
    ends the stream; the answer carries no-store and X-Accel-Buffering: no."""
    for text in "abcde":
        stage.publish(text)
    headers = {**AUTH, "Last-Event-ID": "2"}
    with stage.client.stream("GET", "/streams/a", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"
        stream = events_of(response)
        assert take(stream, 3) == ["3:note", "4:note", "5:note"]
        stage.publish("f", final=True)
        assert take(stream, 1) == ["6:end"]
        assert list(stream) == []  # the final event ended the stream
    assert stage.source.subscribers == set()


def test_finished_stream_the_client_already_has_answers_204(stage: Stage) -> None:
    """Once the final event is stored, Last-Event-ID at it gets 204 (EventSource stops); one
    id earlier gets just the final event."""
    stage.publish("a")
    stage.publish("b", final=True)
    done = stage.client.get("/streams/a", headers={**AUTH, "Last-Event-ID": "2"})
    assert done.status_code == 204
    assert done.content == b""
    assert done.headers["cache-control"].startswith("no-store")
    with stage.client.stream("GET", "/streams/a", headers={**AUTH, "Last-Event-ID": "1"}) as one:
        assert [f"{e.id}:{e.event}" for e in events_of(one)] == ["2:end"]
    assert stage.source.subscribed == 1  # the 204 never subscribed


@limits(heartbeat_seconds=0.1, max_lifetime_seconds=30)
def test_heartbeat_events_arrive_with_the_last_sent_id(stage: Stage) -> None:
    """Named heartbeat events arrive on their period; before any event they carry no id,
    after event 1 they carry id 1 (never an id the stream has not sent)."""
    with stage.client.stream("GET", "/streams/a", headers=AUTH) as response:
        stream = events_of(response)
        first = next(stream)
        assert (first.event, first.id) == ("heartbeat", "")
        assert "ts" in json.loads(first.data)
        stage.publish("a")
        seen = [f"{e.id}:{e.event}" for e in (next(stream) for _ in range(3))]
        assert seen[0] in ("1:note", ":heartbeat")
        assert "1:note" in seen
        assert seen[-1] == "1:heartbeat"


@limits(heartbeat_seconds=30, max_lifetime_seconds=0.5, retry_ms=1500)
def test_max_lifetime_closes_the_stream_with_a_retry_hint(stage: Stage) -> None:
    """A stream with no events ends after its maximum lifetime with ``retry:`` as its last
    bytes, and frees its subscription."""
    stage.publish("a")
    started = time.monotonic()
    with stage.client.stream("GET", "/streams/a", headers=AUTH) as response:
        body = response.read().decode()
    assert 0.4 < time.monotonic() - started < 5
    assert body.startswith("id: 1\nevent: note\n")
    assert body.endswith("retry: 1500\n\n")
    wait_for(lambda: stage.gauge.open == 0 and not stage.source.subscribers, "stream freed")


def test_auth_404_and_bad_resume_are_refused_before_any_stream(stage: Stage) -> None:
    """No key → 401, unknown stream → 404, malformed Last-Event-ID → 400: real statuses, and
    no subscription was ever taken."""
    assert stage.client.get("/streams/a").status_code == 401
    assert stage.client.get("/streams/zzz", headers=AUTH).status_code == 404
    bad = stage.client.get("/streams/a", headers={**AUTH, "Last-Event-ID": "x1"})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"]
    assert stage.source.subscribed == 0
    assert stage.gauge.open == 0


@pytest.mark.parametrize("moment", ["before-read", "after-read"])
def test_no_event_is_lost_between_subscribe_and_backlog_read(stage: Stage, moment: str) -> None:
    """An event published while the stream reads its backlog (stored before or after that
    read's snapshot) is sent exactly once, in order."""
    stage.publish("a")

    def late(source: NoteSource) -> None:
        source.publish("late")

    if moment == "before-read":
        stage.source.before_snapshot = late  # in the backlog and delivered live
    else:
        stage.source.after_snapshot = late  # delivered live only
    with stage.client.stream("GET", "/streams/a", headers=AUTH) as response:
        stream = events_of(response)
        assert take(stream, 2) == ["1:note", "2:note"]
        stage.publish("end", final=True)
        assert take(stream, 5) == ["3:end"]


def test_a_gap_in_live_delivery_is_filled_from_the_store(stage: Stage) -> None:
    """When a subscriber misses a message (stored, never delivered), the next live event
    makes the stream re-read the store: no gap, no duplicate."""
    with stage.client.stream("GET", "/streams/a", headers=AUTH) as response:
        stream = events_of(response)
        wait_for(lambda: len(stage.source.subscribers) == 1, "the subscription")
        stage.publish("lost", deliver=False)
        stage.publish("next")
        stage.publish("end", final=True)
        assert take(stream, 5) == ["1:note", "2:note", "3:end"]


async def _open_and_drop(port: int, count: int, stage: Stage) -> None:
    request = (
        f"GET /streams/a HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    ).encode()
    writers: list[asyncio.StreamWriter] = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
    deadline = time.monotonic() + 30
    while stage.gauge.open != count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert stage.gauge.open == count
    assert len(stage.source.subscribers) == count
    for writer in writers:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


@pytest.mark.slow
@limits(heartbeat_seconds=5, max_lifetime_seconds=60)
def test_a_thousand_streams_opened_and_dropped_leave_no_subscriber(stage: Stage) -> None:
    """1,000 streams held at once, then dropped by their clients: the subscriber count and
    the open-stream gauge both return to 0, and each stream subscribed exactly once."""
    port = int(stage.served.url.rsplit(":", 1)[1])
    asyncio.run(_open_and_drop(port, 1000, stage))
    wait_for(lambda: not stage.source.subscribers, "every subscription freed", timeout=30)
    wait_for(lambda: stage.gauge.open == 0, "the gauge back at 0", timeout=10)
    assert stage.source.subscribed == 1000


async def _hold_idle(port: int, count: int, hold: asyncio.Event) -> list[int]:
    """Open ``count`` streams; each reads until it has 3 heartbeats, then waits for ``hold``."""

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"GET /streams/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        writer.write(head.encode())
        seen = b""
        while seen.count(b"event: heartbeat") < 3 and (chunk := await reader.read(65536)):
            seen += chunk
        await hold.wait()
        writer.close()
        return seen.count(b"event: heartbeat")

    return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 30)


@limits(heartbeat_seconds=0.2, max_lifetime_seconds=30)
def test_idle_streams_get_heartbeats_without_a_ping_task_each(stage: Stage) -> None:
    """200 idle streams each get their heartbeats (one every 0.2 s), yet the server runs
    at most 4 tasks per stream (uvicorn's request, sse-starlette's sender, disconnect and
    shutdown listeners): no ping task or timer of its own per stream."""
    port = int(stage.served.url.rsplit(":", 1)[1])
    idle = stage.client.get("/tasks").json()["tasks"]

    async def main() -> tuple[list[int], int]:
        hold = asyncio.Event()
        holding = asyncio.ensure_future(_hold_idle(port, 200, hold))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while stage.gauge.open < 200:
            assert loop.time() < deadline, stage.gauge.open
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=stage.served.url) as client:
            tasks = (await client.get("/tasks")).json()["tasks"]
        hold.set()
        return await holding, tasks

    beats, tasks = asyncio.run(main())
    assert min(beats) >= 3, sorted(beats)[:5]
    assert tasks - idle <= 4 * 200 + 5, tasks - idle


def test_stream_limits_refuse_nonsense() -> None:
    """Heartbeat and lifetime must be positive and finite, the retry hint not negative."""
    for bad in (
        {"heartbeat_seconds": 0},
        {"max_lifetime_seconds": float("inf")},
        {"retry_ms": -1},
    ):
        with pytest.raises(ValueError):
            StreamLimits(**bad)  # type: ignore[arg-type]


def test_gauge_reports_every_change_to_its_listener() -> None:
    """The gauge's listener sees each new count (the Prometheus gauge's ``set``)."""
    seen: list[int] = []
    gauge = StreamGauge(seen.append)
    gauge._moved(1)
    gauge._moved(1)
    gauge._moved(-1)
    assert (seen, gauge.open) == ([1, 2, 1], 1)
    assert repr(gauge) == "StreamGauge(open=1)"
