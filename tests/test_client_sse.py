"""client/sse.py: the WHATWG event-stream parser, and the resuming reader against a real server."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from sse_support import KEY, NoteSource, stream_app
from support import free_port, wait_for
from tokenbroker.api.connection import BoundedHeadProtocol
from tokenbroker.api.sse import StreamGauge, StreamLimits
from tokenbroker.client.sse import EventParser, ServerEvent, read_events
from tokenbroker.testing.asgi import ServedApp

AUTH = {"Authorization": f"Bearer {KEY}"}


def parse(*chunks: str) -> tuple[list[ServerEvent], EventParser]:
    parser = EventParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events, parser


def test_multi_line_data_comments_and_named_events() -> None:
    """data lines join with LF, one leading space is dropped, comments and unknown fields are
    ignored, the event name defaults to ``message``."""
    events, _ = parse(": hello\nevent: note\ndata: a\ndata:  b\nfoo: x\n\ndata\ndata:c\n\n")
    assert events == [ServerEvent("note", "a\n b", ""), ServerEvent("message", "\nc", "")]


def test_every_line_ending_even_split_across_chunks() -> None:
    """CRLF, LF and CR all end lines, a CR at a chunk's end waits for a possible LF, and a
    leading BOM is dropped."""
    events, _ = parse("\ufeffdata: 1\r", "\nid: 7\r\r", "data: 2\n", "\n", "data: 3\r", "\r")
    assert len(events) == 3  # the last CR is a line end at once, not held for an LF
    assert [(e.data, e.id) for e in events] == [("1", "7"), ("2", "7"), ("3", "7")]


def test_ids_carry_over_and_ids_with_nul_are_ignored() -> None:
    """The last event id persists across events; an id holding NUL changes nothing; an event
    without data is not dispatched but its id is kept."""
    events, parser = parse("id: 1\ndata: a\n\nid: 2\n\nid: x\0y\ndata: b\n\n")
    assert [(e.data, e.id) for e in events] == [("a", "1"), ("b", "2")]
    assert parser.last_event_id == "2"


def test_retry_takes_only_ascii_digits() -> None:
    """``retry:`` sets the reconnection time only when it is all ASCII digits."""
    _, parser = parse("retry: 1500\n\nretry: 2x\n\nretry: ١٢\n\n")
    assert parser.retry_ms == 1500
    assert "1500" in repr(parser)


class CuttableProxy:
    """A TCP forwarder on 127.0.0.1 whose open connections the test can cut at once."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection open now (both sides see the TCP connection end)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


class Stage:
    def __init__(self, limits: StreamLimits) -> None:
        self.source = NoteSource()
        app, self.seen = stream_app({"a": self.source}, StreamGauge(), limits)
        self.served = ServedApp(app, http=BoundedHeadProtocol).start()
        self.port = int(self.served.url.rsplit(":", 1)[1])
        self.admin = httpx.Client(base_url=self.served.url, timeout=10)

    def publish(self, text: str, final: bool = False) -> None:
        self.admin.post("/streams/a/events", json={"text": text, "final": final})


@pytest.fixture
def stage(request: pytest.FixtureRequest) -> Iterator[Stage]:
    limits = getattr(request, "param", None) or StreamLimits(max_lifetime_seconds=30)
    staged = Stage(limits)
    yield staged
    staged.admin.close()
    staged.served.stop()


def test_a_dropped_connection_resumes_with_no_gap_and_no_duplicate(stage: Stage) -> None:
    """Cut mid-stream after event 3 while 4 and 5 are published: the reader reconnects with
    Last-Event-ID 3 and yields 1..6 exactly once each, stopping after the final event."""
    proxy = CuttableProxy(stage.port)
    delays: list[float] = []
    try:
        for text in "abc":
            stage.publish(text)
        got: list[str] = []
        with httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", timeout=10) as client:
            for event in read_events(
                client, "/streams/a", headers=AUTH, final={"end"}, sleep=delays.append
            ):
                if event.event == "heartbeat":
                    continue
                got.append(event.id)
                if event.id == "3":
                    proxy.cut()
                    stage.publish("d")
                    stage.publish("e")
                    stage.publish("f", final=True)
    finally:
        proxy.close()
    assert got == ["1", "2", "3", "4", "5", "6"]
    assert stage.seen == [None, "3"]
    assert delays == [0.0]  # the drop followed progress: reconnect at once


def test_a_finished_stream_answers_204_and_the_reader_stops(stage: Stage) -> None:
    """Resuming at the final event's id yields nothing and makes one request only."""
    stage.publish("a")
    stage.publish("z", final=True)
    with httpx.Client(base_url=stage.served.url, timeout=10) as client:
        assert list(read_events(client, "/streams/a", headers=AUTH, last_event_id="2")) == []
    assert stage.seen == ["2"]


@pytest.mark.parametrize(
    "stage", [StreamLimits(max_lifetime_seconds=0.3, retry_ms=50)], indirect=True, ids=[""]
)
def test_a_stream_closed_at_its_lifetime_is_resumed_after_the_retry_hint(stage: Stage) -> None:
    """The server ends a quiet stream at its maximum lifetime; the reader waits the ``retry:``
    time and resumes from the last id until the final event comes."""
    stage.publish("a")
    delays: list[float] = []

    def finish_once_resumed() -> None:
        wait_for(lambda: len(stage.seen) >= 2, "the resumed request")
        stage.publish("z", final=True)

    finisher = threading.Thread(target=finish_once_resumed)
    finisher.start()
    with httpx.Client(base_url=stage.served.url, timeout=10) as client:
        reader = read_events(client, "/streams/a", headers=AUTH, final={"end"}, sleep=delays.append)
        got = [f"{event.id}:{event.event}" for event in reader]
    finisher.join(10)
    assert got == ["1:note", "2:end"]
    assert stage.seen[:2] == [None, "1"]
    assert delays[0] == 0.05
    assert set(stage.seen[1:]) == {"1"}  # every resume asked for what came after 1


def test_reconnects_are_bounded_with_exponential_backoff() -> None:
    """Against a port nobody listens on, the reader tries max_retries + 1 times, backing off
    0.25, 0.5, 1 s, then raises the transport error."""
    delays: list[float] = []
    port = free_port()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:
        reader = read_events(client, "/streams/a", max_retries=3, sleep=delays.append)
        with pytest.raises(httpx.ConnectError):
            next(reader)
    assert delays == [0.25, 0.5, 1.0]


def test_a_refused_stream_raises_the_status(stage: Stage) -> None:
    """A 401 or 404 is not retried: it raises at once, after one request."""
    with httpx.Client(base_url=stage.served.url, timeout=10) as client:
        with pytest.raises(httpx.HTTPStatusError) as raised:
            next(read_events(client, "/streams/a"))
        assert raised.value.response.status_code == 401
    assert stage.seen == []
