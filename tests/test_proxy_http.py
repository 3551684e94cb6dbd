"""The reverse proxy speaks correct HTTP/1.1: raw sockets and curl against a recording upstream."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import BrokerFactory
from support import BROKEN_BODIES, CHUNKED_HEAD, client_credentials, stampede, wait_for
from tokenbroker import Broker, parse_settings
from tokenbroker.config import ProxySettings
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.proxy.connection import MAX_PIPELINED
from tokenbroker.testing import AuthorizationServer, RecordingUpstream, ServedProxy

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

TIMEOUT = 10.0
"""Seconds any one socket operation may take before the test fails."""
STALL = 1.0
"""Seconds without progress after which a flooding sender counts its peer as stalled."""
FLOOD_CAP = 256 << 20
"""Bytes a flood offers: far beyond what loopback buffers (a few MiB per socket) can hold."""
BUFFERED_LIMIT = 64 << 20
"""Bytes a streaming proxy may take in while its other side is stalled (kernel buffers)."""


def pattern(size: int) -> bytes:
    """The body of ``/api/download?bytes=size``: byte ``i`` is ``i % 251``."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw(
    method: str, target: str, *headers: str, body: bytes = b"", version: str = "HTTP/1.1"
) -> bytes:
    """One request's bytes: a Host header, ``headers``, and a Content-Length for an unframed body."""
    lines = [f"{method} {target} {version}", "Host: 127.0.0.1", *headers]
    framed = any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in headers)
    if body and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def chunked(*pieces: bytes) -> bytes:
    """Non-empty ``pieces`` in the chunked transfer coding, then the last chunk (RFC 9112 §7.1)."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@dataclass
class Reply:
    """One response as read off the wire; header names lowercased, in arrival order."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Incomplete(Exception):
    """The connection ended inside a response body; ``reply`` holds what arrived."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"closed after {len(reply.body)} body bytes of a {reply.status}")
        self.reply = reply


class Client:
    """One raw client connection to the proxy: send bytes, read responses one at a time."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, target: str, *headers: str, **kwargs: Any) -> Reply:
        self.send(raw(method, target, *headers, **kwargs))
        return self.read(method)

    def read(self, method: str = "GET") -> Reply:
        """Read one response: the head, then the body as its framing says (RFC 9112 §6.3)."""
        line = self.file.readline(65536)
        if not line:
            raise ConnectionError("the connection closed before a status line")
        reply = Reply(int(line.split()[1]))
        while (line := self.file.readline(65536)) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            reply.headers.append((name.strip().lower(), value.strip()))
        if method == "HEAD" or reply.status in (204, 304) or reply.status < 200:
            return reply
        try:
            if "chunked" in (reply.header("transfer-encoding") or "").lower():
                while size := int(self._line(reply).split(b";")[0], 16):
                    self._take(reply, size)
                    if self.file.read(2) != b"\r\n":
                        raise Incomplete(reply)
                while self._line(reply) not in (b"\r\n", b"\n"):
                    pass  # trailer fields
            elif (length := reply.header("content-length")) is not None:
                self._take(reply, int(length))
            else:
                while piece := self.file.read1(65536):
                    reply.body += piece
        except ConnectionResetError as exc:
            raise Incomplete(reply) from exc
        return reply

    def _line(self, reply: Reply) -> bytes:
        line = self.file.readline(1024)
        if not line.endswith(b"\n"):
            raise Incomplete(reply)
        return line

    def _take(self, reply: Reply, size: int) -> None:
        while size:
            piece = self.file.read1(size)
            if not piece:
                raise Incomplete(reply)
            reply.body += piece
            size -= len(piece)

    def closed_by_peer(self) -> bool:
        """Whether the proxy ends the connection (EOF or RST) within TIMEOUT, sending nothing more."""
        try:
            return self.file.read1(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def route(upstream: str, prefix: str = "/") -> dict[str, str]:
    return {"prefix": prefix, "upstream": upstream, "provider": "svc", "mode": "shared"}


@contextlib.contextmanager
def serve(broker: Broker, *routes: dict[str, str], **options: Any) -> Iterator[ServedProxy]:
    """The proxy for ``routes`` on a free loopback port; ``options`` are ProxySettings fields."""
    settings = ProxySettings.model_validate({"listen": "127.0.0.1:0", "routes": routes, **options})
    with ServedProxy(broker, settings) as proxy:
        yield proxy


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream(idp=None) as server:
        yield server


@pytest.fixture
def broker(auth_server: AuthorizationServer, make_broker: BrokerFactory) -> Broker:
    return make_broker({"svc": client_credentials(auth_server)})


@pytest.fixture
def token(broker: Broker) -> str:
    """The shared token the proxy injects (fetched once; the proxy reads the same cache)."""
    return broker.get_token("svc").access_token


@pytest.fixture
def proxy(broker: Broker, upstream: RecordingUpstream) -> Iterator[ServedProxy]:
    with serve(broker, route(upstream.url)) as served:
        yield served


@pytest.fixture
def prefixed(broker: Broker, upstream: RecordingUpstream) -> Iterator[ServedProxy]:
    """A proxy whose only route is ``/db/`` → the upstream's ``/api/``."""
    with serve(broker, route(upstream.url + "/api/", "/db/")) as served:
        yield served


@contextlib.contextmanager
def hand_driven_upstream() -> Iterator[socket.socket]:
    """A listening socket the test itself accepts on and answers from (or never reads)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        yield listener


def read_head(sock: socket.socket) -> bytes:
    """Receive until the end of a request head (and perhaps a little body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before a complete head: {data!r}"
        data += piece
    return data


def flood(sock: socket.socket, cap: int) -> int:
    """Send up to ``cap`` bytes until the peer takes nothing for STALL seconds; return bytes sent."""
    sock.settimeout(STALL)
    piece = bytes(65536)
    sent = 0
    with contextlib.suppress(TimeoutError):
        while sent < cap:
            sent += sock.send(piece[: cap - sent])
    return sent


# -- bodies ----------------------------------------------------------------------------------------


def test_content_length_upload_arrives_whole(
    proxy: ServedProxy, upstream: RecordingUpstream
) -> None:
    """A 1 MiB Content-Length request body reaches the upstream byte for byte."""
    body = pattern(1 << 20)
    with Client(proxy.url) as client:
        reply = client.request("POST", "/api/upload", body=body)
    assert reply.status == 200
    assert reply.json() == {"bytes": len(body), "sha256": sha256(body)}
    assert [(r.method, r.path) for r in upstream.records()] == [("POST", "/api/upload")]


def test_chunked_upload_arrives_whole(proxy: ServedProxy) -> None:
    """A chunked request body of odd-sized chunks reaches the upstream byte for byte, and the
    connection then serves another request."""
    data = pattern(400_000)
    cuts = [0, 1, 11, 4107, 69643, 369643, 399997, 400_000]
    pieces = [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    with Client(proxy.url) as client:
        reply = client.request(
            "PUT", "/api/upload", "Transfer-Encoding: chunked", body=chunked(*pieces)
        )
        after = client.request("GET", "/api/echo")
    assert reply.status == 200
    assert reply.json() == {"bytes": len(data), "sha256": sha256(data)}
    assert after.status == 200


def test_chunk_extensions_and_request_trailers_are_accepted(proxy: ServedProxy) -> None:
    """Chunk extensions and trailer fields (RFC 9112 §7.1.1, §7.1.2) do not disturb the body."""
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    with Client(proxy.url) as client:
        reply = client.request("POST", "/api/upload", "Transfer-Encoding: chunked", body=body)
        after = client.request("GET", "/api/echo")
    assert reply.status == 200
    assert reply.json() == {"bytes": 11, "sha256": sha256(b"hello world")}
    assert after.status == 200


@pytest.mark.parametrize("framing", ["", "&chunked=1"], ids=["content-length", "chunked"])
def test_download_is_relayed_whole_and_the_connection_stays_usable(
    proxy: ServedProxy, framing: str
) -> None:
    """A 1 MB response (Content-Length or chunked upstream) arrives intact, framed so that the
    next response on the same connection parses."""
    with Client(proxy.url) as client:
        reply = client.request("GET", f"/api/download?bytes=1000000{framing}")
        after = client.request("GET", "/api/echo?after=1")
    assert reply.status == 200
    assert len(reply.body) == 1_000_000
    assert reply.body == pattern(1_000_000)
    assert after.status == 200
    assert after.json()["query"] == "after=1"


def test_close_delimited_upstream_body_is_relayed_intact(proxy: ServedProxy) -> None:
    """An upstream body framed only by the connection closing reaches the client complete."""
    with Client(proxy.url) as client:
        reply = client.request("GET", "/api/unframed")
    with Client(proxy.url) as client:
        after = client.request("GET", "/api/echo")
    assert reply.status == 200
    assert reply.body == b"unframed-body"
    assert after.status == 200


def test_chunked_upstream_body_with_trailers_keeps_the_connection_usable(
    proxy: ServedProxy,
) -> None:
    """A chunked body with a trailer field is relayed intact, without the hop-by-hop Trailer header."""
    with Client(proxy.url) as client:
        reply = client.request("GET", "/api/trailers")
        after = client.request("GET", "/api/echo")
    assert reply.status == 200
    assert reply.body == b"trailer-body"
    assert reply.header("trailer") is None
    assert after.status == 200


# -- responses without a body ----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["", "&chunked=1"], ids=["content-length", "chunked"])
def test_head_has_no_body(proxy: ServedProxy, upstream: RecordingUpstream, framing: str) -> None:
    """HEAD is sent upstream as HEAD and answered with headers only; the connection stays usable."""
    with Client(proxy.url) as client:
        reply = client.request("HEAD", f"/api/download?bytes=5000{framing}")
        after = client.request("GET", "/api/echo?after=1")
    assert reply.status == 200
    if not framing:
        assert reply.header("content-length") == "5000"
    assert after.status == 200
    assert after.json()["query"] == "after=1"
    assert [r.method for r in upstream.records()] == ["HEAD", "GET"]


@pytest.mark.parametrize("code", [204, 304])
def test_204_and_304_have_no_body(proxy: ServedProxy, code: int) -> None:
    """204 and 304 are relayed without a body or chunked framing; the next response still parses."""
    with Client(proxy.url) as client:
        reply = client.request("GET", f"/api/status/{code}")
        after = client.request("GET", "/api/echo?after=1")
    assert reply.status == code
    assert reply.header("transfer-encoding") is None
    assert after.status == 200
    assert after.json()["query"] == "after=1"


# -- connection management -------------------------------------------------------------------------


def test_expect_100_continue_gets_100_before_the_body(proxy: ServedProxy) -> None:
    """A client that waits for ``100 Continue`` gets it, sends the body, then the final answer."""
    body = pattern(4096)
    with Client(proxy.url) as client:
        client.send(
            raw("POST", "/api/upload", f"Content-Length: {len(body)}", "Expect: 100-continue")
        )
        interim = client.read()
        assert interim.status == 100
        client.send(body)
        final = client.read("POST")
    assert final.status == 200
    assert final.json() == {"bytes": len(body), "sha256": sha256(body)}


def test_connection_close_is_honoured(proxy: ServedProxy) -> None:
    """After answering a ``Connection: close`` request the proxy closes the connection."""
    with Client(proxy.url) as client:
        reply = client.request("GET", "/api/echo", "Connection: close")
        assert reply.status == 200
        assert client.closed_by_peer()


def test_http_1_0_client_gets_an_unchunked_body_then_close(proxy: ServedProxy) -> None:
    """An HTTP/1.0 client gets a chunked upstream body without chunked coding, then EOF."""
    with Client(proxy.url) as client:
        reply = client.request("GET", "/api/download?bytes=5000&chunked=1", version="HTTP/1.0")
        assert client.closed_by_peer()
    assert reply.status == 200
    assert reply.header("transfer-encoding") is None
    assert reply.body == pattern(5000)


def test_pipelined_requests_are_answered_in_order(
    proxy: ServedProxy, upstream: RecordingUpstream
) -> None:
    """Five requests sent in one write come back in order, each with its own answer."""
    batch = (
        raw("GET", "/api/echo?i=0")
        + raw("POST", "/api/echo?i=1", body=b"seven!!")
        + raw("HEAD", "/api/download?bytes=300")
        + raw("GET", "/api/download?bytes=300&chunked=1")
        + raw("PUT", "/api/echo?i=4", "Transfer-Encoding: chunked", body=chunked(b"abc", b"de"))
    )
    with Client(proxy.url) as client:
        client.send(batch)
        first, second = client.read(), client.read("POST")
        third, fourth, fifth = client.read("HEAD"), client.read(), client.read("PUT")
    assert (first.json()["method"], first.json()["query"]) == ("GET", "i=0")
    assert (second.json()["method"], second.json()["query"]) == ("POST", "i=1")
    assert second.json()["body_bytes"] == 7
    assert (third.status, third.header("content-length"), third.body) == (200, "300", b"")
    assert fourth.body == pattern(300)
    assert (fifth.json()["method"], fifth.json()["query"]) == ("PUT", "i=4")
    assert fifth.json()["body_bytes"] == 5
    assert len(upstream.records()) == 5


def test_pipelined_local_errors_keep_their_place(
    prefixed: ServedProxy, upstream: RecordingUpstream
) -> None:
    """A 404 and a 400 the proxy answers itself come back in request order, after the slow
    upstream answer that precedes them."""
    batch = (
        raw("GET", "/db/slow?seconds=0.3")
        + raw("GET", "/nowhere")
        + raw("GET", "/db/echo?i=2")
        + raw("GET", "/db/%2e%2e/echo")
    )
    with Client(prefixed.url) as client:
        client.send(batch)
        replies = [client.read() for _ in range(4)]
    assert [r.status for r in replies] == [200, 404, 200, 400]
    assert replies[0].json() == {"slept": 0.3}
    assert replies[2].json()["query"] == "i=2"
    assert [r.path for r in upstream.records()] == ["/api/slow", "/api/echo"]


def test_pipelined_requests_are_parsed_only_a_few_ahead_of_their_answers(
    proxy: ServedProxy, upstream: RecordingUpstream
) -> None:
    """200 requests pipelined in one write behind a slow one are parsed at most
    MAX_PIPELINED ahead of their answers (the rest waits as bytes), and all 201 answers
    still come back in order, a body full of CRLFs among them intact."""
    body = b"x\r\n\r\nGET /api/echo HTTP/1.1\r\n\r\n" * 20  # head ends inside a body
    batch = [raw("GET", "/api/slow?seconds=1")]
    for i in range(200):
        if i == 100:
            batch.append(raw("POST", f"/api/echo?i={i}", body=body))
        else:
            batch.append(raw("GET", f"/api/echo?i={i}"))
    server = proxy.server
    with Client(proxy.url) as client:
        client.send(b"".join(batch))
        queued = []
        while not select.select([client.sock], [], [], 0.01)[0]:  # until the slow answer
            queued.extend(c.queued for c in list(server.connections))
        replies = [client.read("GET") for _ in range(201)]
    assert 0 < max(queued) <= MAX_PIPELINED, max(queued)
    assert replies[0].json() == {"slept": 1.0}
    assert [r.json()["query"] for r in replies[1:]] == [f"i={i}" for i in range(200)]
    assert replies[101].json()["method"] == "POST"
    assert replies[101].json()["body_bytes"] == len(body)
    assert len(upstream.records()) == 201


def test_keep_alive_on_both_sides(proxy: ServedProxy, upstream: RecordingUpstream) -> None:
    """29 sequential requests on four client connections reach the upstream over one kept-alive
    upstream connection."""
    with Client(proxy.url) as client:
        for i in range(20):
            reply = client.request("GET", f"/api/echo?i={i}")
            assert (reply.status, reply.json()["query"]) == (200, f"i={i}")
    for c in range(3):
        with Client(proxy.url) as client:
            for i in range(3):
                reply = client.request("GET", f"/api/echo?c={c}&i={i}")
                assert (reply.status, reply.json()["query"]) == (200, f"c={c}&i={i}")
    records = upstream.records()
    assert len(records) == 29
    assert {r.connection for r in records} == {records[0].connection}
    assert upstream.connections_accepted == 1


def test_the_upstream_pool_keeps_at_most_upstream_keepalive_connections(
    broker: Broker, token: str, upstream: RecordingUpstream
) -> None:
    """Six concurrent slow requests open six upstream connections; the next six concurrent ones
    reuse at most ``upstream_keepalive`` (2) of them."""
    with serve(broker, route(upstream.url), upstream_keepalive=2) as proxy:

        def slow() -> int:
            with Client(proxy.url) as client:
                return client.request("GET", "/api/slow?seconds=1").status

        assert stampede(6, slow) == [200] * 6
        first = {r.connection for r in upstream.records()}
        assert len(first) == 6
        assert stampede(6, slow) == [200] * 6
        second = {r.connection for r in upstream.records()[6:]}
    assert len(first & second) <= 2


# -- broken requests, trailers and versions --------------------------------------------------------


def open_fds() -> int:
    """File descriptors this process (the proxy runs in it) holds now."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def send_broken_body(client: Client, upstream: RecordingUpstream, name: str) -> None:
    """Send a chunked POST that breaks off (see BROKEN_BODIES) once the upstream has read its
    head and waits for the body."""
    coding, rest = BROKEN_BODIES[name]
    client.send(CHUNKED_HEAD % coding)
    if coding == b"chunked":  # (xchunked is refused before anything is forwarded)
        wait_for(lambda: len(upstream.records()) == 1, "the upstream to read the head")
    client.send(rest)


@pytest.mark.parametrize("name", list(BROKEN_BODIES))
def test_a_client_leaving_a_broken_request_body_leaves_no_socket_behind(
    proxy: ServedProxy, upstream: RecordingUpstream, token: str, name: str
) -> None:
    """A client that hangs up after a malformed chunked body (or in the middle of one) ends
    the exchange at once: the half-sent upstream connection is closed and the process holds no
    more descriptors than before (nothing left in CLOSE-WAIT)."""
    before = open_fds()
    with Client(proxy.url) as client:
        send_broken_body(client, upstream, name)
    broken = {r.connection for r in upstream.records()}
    wait_for(lambda: not broken & upstream.open_connections, "the upstream connection to close")
    wait_for(lambda: open_fds() <= before, f"descriptors back to {before}")


@pytest.mark.parametrize("name", [name for name in BROKEN_BODIES if name != "eof"])
def test_a_malformed_chunked_body_gets_400_and_a_close(
    proxy: ServedProxy, upstream: RecordingUpstream, token: str, name: str
) -> None:
    """A malformed chunked body is answered 400 with ``Connection: close`` at once, though the
    upstream still waits for the body, and the proxy then closes the connection."""
    with Client(proxy.url) as client:
        client.sock.settimeout(5)
        send_broken_body(client, upstream, name)
        try:
            reply = client.read("POST")
        except TimeoutError:
            pytest.fail("no answer to a malformed chunked body")
        assert client.closed_by_peer()
    assert_error_body(reply, 400, "bad_request")
    assert reply.header("connection") == "close"


def test_a_malformed_body_behind_pipelined_requests_is_refused_after_their_answers(
    proxy: ServedProxy, upstream: RecordingUpstream
) -> None:
    """Requests pipelined before a malformed chunked body are answered in order, then the
    400, then the close; the malformed request never reaches the upstream."""
    with Client(proxy.url) as client:
        client.send(
            raw("GET", "/api/slow?seconds=0.3")
            + raw("GET", "/api/echo?i=2")
            + raw("POST", "/api/upload", "Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n")
        )
        replies = [client.read() for _ in range(3)]
        assert client.closed_by_peer()
    assert [r.status for r in replies] == [200, 200, 400]
    assert_error_body(replies[2], 400, "bad_request")
    assert [r.path for r in upstream.records()] == ["/api/slow", "/api/echo"]


def test_a_body_breaking_off_under_a_begun_response_drops_both_connections(
    broker: Broker,
) -> None:
    """When the upstream has begun its answer before the request body turns out malformed,
    the client's connection is dropped (the response cannot complete) and so is the
    upstream's."""
    with hand_driven_upstream() as listener:
        port = listener.getsockname()[1]
        with serve(broker, route(f"http://127.0.0.1:{port}")) as proxy, Client(proxy.url) as c:
            c.send(raw("POST", "/early", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n")
            conn, _ = listener.accept()
            with conn:
                read_head(conn)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                assert c.file.readline().startswith(b"HTTP/1.1 200 ")
                c.send(b"zz\r\n")
                conn.settimeout(TIMEOUT)
                with contextlib.suppress(ConnectionResetError):
                    while conn.recv(65536):
                        pass  # the rest of the first chunk, then the close
                received = b""
                with contextlib.suppress(ConnectionResetError):
                    while piece := c.file.read1(65536):  # until the proxy drops it
                        received += piece
    assert len(received.partition(b"\r\n\r\n")[2]) < 100


def test_request_trailers_never_reach_the_next_request(
    proxy: ServedProxy, upstream: RecordingUpstream
) -> None:
    """Trailer fields of a chunked request are dropped: they do not become header fields of
    the request that follows on the same connection (pipelined or not)."""
    body = b"5\r\nhello\r\n0\r\nX-Leak: trailer\r\nX-Client: smuggled\r\n\r\n"
    with Client(proxy.url) as client:
        client.send(
            raw("POST", "/api/echo?i=1", "Transfer-Encoding: chunked", "X-Client: one", body=body)
            + raw("GET", "/api/echo?i=2", "X-Client: two")
        )
        first, second = client.read("POST"), client.read()
        third = client.request("GET", "/api/echo?i=3", "X-Client: three")
    assert (first.status, second.status, third.status) == (200, 200, 200)
    assert first.json()["body_bytes"] == 5
    assert [r.client for r in upstream.records()] == ["one", "two", "three"]
    for record in upstream.records():
        names = [name for name, _ in record.headers]
        assert "x-leak" not in names
        assert names.count("x-client") == 1
        assert "trailer" not in json.dumps(record.headers)


def test_an_upgrade_request_is_answered_then_the_connection_closes(
    proxy: ServedProxy, upstream: RecordingUpstream
) -> None:
    """Upgrades are not relayed: the request is answered with ``Connection: close`` and the
    connection closes; what followed it on the wire is never parsed as a request."""
    with Client(proxy.url) as client:
        client.send(
            raw("GET", "/api/echo", "Connection: upgrade", "Upgrade: websocket")
            + raw("GET", "/api/echo?smuggled=1")
        )
        reply = client.read()
        assert client.closed_by_peer()
    assert reply.status == 200
    assert reply.header("connection") == "close"
    assert [r.path for r in upstream.records()] == ["/api/echo"]


def head_of(reply: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The status line and the (lowercased) header fields of a raw response."""
    head = reply.partition(b"\r\n\r\n")[0].split(b"\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in head[1:])
    return head[0], fields


def read_until_closed(client: Client) -> bytes:
    data = b""
    while piece := client.file.read1(65536):
        data += piece
    return data


def test_an_http_1_0_client_gets_http_1_1_status_lines_and_1_0_framing(proxy: ServedProxy) -> None:
    """Responses to an HTTP/1.0 request carry the proxy's own version (RFC 9110 §2.5, as nginx
    and Envoy answer), relayed or the proxy's own, and are framed for a 1.0 client: a length
    or the close, never chunked."""
    for target, status, length in [
        ("/api/echo", b"200", True),
        ("/api/download?bytes=300&chunked=1", b"200", False),
        ("/api/%2e%2e/echo", b"400", True),
    ]:
        with Client(proxy.url) as client:
            client.send(raw("GET", target, version="HTTP/1.0"))
            line, fields = head_of(read_until_closed(client))
        assert line.startswith(b"HTTP/1.1 " + status + b" "), (target, line)
        assert b"transfer-encoding" not in fields
        assert (b"content-length" in fields) is length


@pytest.mark.parametrize("version", ["HTTP/0.9", "HTTP/2.0"])
def test_other_http_versions_get_505_and_nothing_is_forwarded(
    proxy: ServedProxy, upstream: RecordingUpstream, version: str
) -> None:
    """A request line with a version other than HTTP/1.0 or 1.1 gets the proxy's HTTP/1.1 505
    and a close; nothing reaches the upstream."""
    with Client(proxy.url) as client:
        client.send(raw("GET", "/api/echo", version=version))
        reply = read_until_closed(client)
    line, fields = head_of(reply)
    assert line.startswith(b"HTTP/1.1 505 "), line
    assert fields[b"connection"] == b"close"
    assert upstream.records() == []


def test_a_relayed_http_1_0_upstream_answer_gets_the_proxy_s_status_line(broker: Broker) -> None:
    """An upstream answering ``HTTP/1.0`` is relayed under the proxy's own ``HTTP/1.1`` status
    line (the version names the hop, not the message)."""
    with hand_driven_upstream() as listener:
        port = listener.getsockname()[1]
        with serve(broker, route(f"http://127.0.0.1:{port}")) as proxy, Client(proxy.url) as c:
            c.send(raw("GET", "/old"))
            conn, _ = listener.accept()
            with conn:
                read_head(conn)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += c.file.readline()
                line, fields = head_of(head)
                body = c.file.read(int(fields[b"content-length"]))
    assert line == b"HTTP/1.1 200 OK"
    assert body == b"ok"


# -- upstream failures -----------------------------------------------------------------------------


def assert_error_body(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status
    assert (reply.header("content-type") or "").startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]


def test_upstream_reset_before_the_response_is_502(proxy: ServedProxy) -> None:
    """An upstream that resets the connection instead of answering gives our 502 body."""
    with Client(proxy.url) as client:
        reply = client.request("GET", "/api/reset")
    assert_error_body(reply, 502, "upstream_unavailable")


def test_refused_upstream_is_502(broker: Broker) -> None:
    """An upstream port that refuses connections gives our 502 body."""
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
        port = closed_port.getsockname()[1]
        with serve(broker, route(f"http://127.0.0.1:{port}")) as proxy, Client(proxy.url) as c:
            reply = c.request("GET", "/api/echo")
    assert_error_body(reply, 502, "upstream_unavailable")


def test_upstream_reset_mid_body_is_not_passed_off_as_success(proxy: ServedProxy) -> None:
    """When the upstream resets 10 bytes into a 1000-byte body, the client sees the 200 head and
    those bytes, then the connection closes before the announced length."""
    with Client(proxy.url) as client:
        client.send(raw("GET", "/api/reset-mid"))
        with pytest.raises(Incomplete) as cut:
            client.read()
    reply = cut.value.reply
    assert reply.status == 200
    assert len(reply.body) < 1000
    assert b"0123456789".startswith(reply.body)


def test_upstream_timeout_is_504(broker: Broker, token: str, upstream: RecordingUpstream) -> None:
    """An upstream slower than ``upstream_timeout_seconds`` gives our 504 body at that timeout."""
    with (
        serve(broker, route(upstream.url), upstream_timeout_seconds=0.5) as proxy,
        Client(proxy.url) as client,
    ):
        started = time.monotonic()
        reply = client.request("GET", "/api/slow?seconds=3")
        elapsed = time.monotonic() - started
    assert_error_body(reply, 504, "upstream_timeout")
    assert 0.4 <= elapsed < 2.5


def test_a_slow_upload_is_not_an_upstream_timeout(
    broker: Broker, token: str, upstream: RecordingUpstream
) -> None:
    """``upstream_timeout_seconds`` bounds the upstream's silence, not the client's upload: a
    chunked body the client paces over ~1.2 s still gets the upstream's answer with a 0.5 s
    timeout."""
    pieces = [pattern(100_000)] * 3
    with (
        serve(broker, route(upstream.url), upstream_timeout_seconds=0.5) as proxy,
        Client(proxy.url) as client,
    ):
        with contextlib.suppress(OSError):  # a proxy that gave up may close on us
            client.send(raw("PUT", "/api/upload", "Transfer-Encoding: chunked"))
            for piece in pieces:
                time.sleep(0.4)  # the client is slow on purpose
                client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            client.send(b"0\r\n\r\n")
        reply = client.read("PUT")
    assert reply.status == 200, reply.body
    assert reply.json() == {"bytes": 300_000, "sha256": sha256(b"".join(pieces))}


def test_an_upstream_stalling_mid_body_is_cut_off(broker: Broker) -> None:
    """An upstream that stops sending in the middle of a body is given up on after
    ``upstream_timeout_seconds``: the client connection closes short of Content-Length."""
    with hand_driven_upstream() as listener:
        port = listener.getsockname()[1]
        with (
            serve(broker, route(f"http://127.0.0.1:{port}"), upstream_timeout_seconds=0.5) as proxy,
            Client(proxy.url) as client,
        ):
            client.send(raw("GET", "/stall"))
            conn, _ = listener.accept()
            with conn:
                read_head(conn)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                try:
                    with pytest.raises(Incomplete) as cut:
                        client.read()
                except TimeoutError:
                    pytest.fail(f"the proxy still holds the connection after {TIMEOUT} s")
    assert cut.value.reply.status == 200
    assert cut.value.reply.body == b"0123456789"


def test_an_idle_upstream_connection_the_upstream_closed_is_not_an_error(broker: Broker) -> None:
    """After the upstream closes a kept-alive connection, the next request goes out on a new one
    and succeeds."""
    with hand_driven_upstream() as listener:
        port = listener.getsockname()[1]
        with serve(broker, route(f"http://127.0.0.1:{port}")) as proxy, Client(proxy.url) as c:
            c.send(raw("GET", "/one"))
            first, _ = listener.accept()
            with first:
                read_head(first)
                first.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
                assert c.read().body == b"one"
            c.send(raw("GET", "/two"))
            second, _ = listener.accept()
            with second:
                assert read_head(second).startswith(b"GET /two HTTP/1.1\r\n")
                second.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
                reply = c.read()
    assert (reply.status, reply.body) == (200, b"two")


def test_a_post_is_not_sent_again_after_a_reset(broker: Broker) -> None:
    """A POST whose reused upstream connection closes without an answer gets 502 and is not
    replayed on a new connection (a proxy must not retry non-idempotent requests, RFC 9110
    §9.2.2)."""
    with hand_driven_upstream() as listener:
        port = listener.getsockname()[1]
        with (
            serve(broker, route(f"http://127.0.0.1:{port}"), upstream_timeout_seconds=1) as proxy,
            Client(proxy.url) as client,
        ):
            client.send(raw("GET", "/first"))
            conn, _ = listener.accept()
            with conn:
                read_head(conn)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                assert client.read().body == b"ok"
                client.send(raw("POST", "/pay", body=b"amount=1"))
                assert read_head(conn).startswith(b"POST /pay HTTP/1.1\r\n")
            reply = client.read("POST")
            listener.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                listener.accept()[0].close()
                pytest.fail("the POST was sent upstream a second time")
    assert_error_body(reply, 502, "upstream_unavailable")


# -- backpressure ----------------------------------------------------------------------------------


def test_a_client_that_stops_reading_stalls_the_upstream(broker: Broker) -> None:
    """While the client reads nothing, the proxy takes in only a bounded part of a huge response
    (it stops reading the upstream instead of buffering)."""
    with hand_driven_upstream() as listener:
        port = listener.getsockname()[1]
        with serve(broker, route(f"http://127.0.0.1:{port}")) as proxy, Client(proxy.url) as c:
            c.send(raw("GET", "/big"))
            conn, _ = listener.accept()
            with conn:
                read_head(conn)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % FLOOD_CAP)
                taken = flood(conn, FLOOD_CAP)
    assert taken < BUFFERED_LIMIT


def test_an_upstream_that_stops_reading_stalls_the_client(broker: Broker) -> None:
    """While the upstream reads nothing, the proxy takes in only a bounded part of a huge upload
    (it streams the request and stops reading the client instead of buffering)."""
    start = pattern(128 << 10)
    with hand_driven_upstream() as listener:
        port = listener.getsockname()[1]
        with serve(broker, route(f"http://127.0.0.1:{port}")) as proxy, Client(proxy.url) as c:
            c.send(raw("POST", "/big", f"Content-Length: {FLOOD_CAP}") + start)
            conn, _ = listener.accept()
            with conn:
                read_head(conn)
                taken = flood(c.sock, FLOOD_CAP - len(start))
    assert taken < BUFFERED_LIMIT


# -- routes and paths ------------------------------------------------------------------------------

# -- framing ---------------------------------------------------------------------------------------


BODY = chunked(b"abc")
REFUSED_CODINGS = [
    pytest.param(("Transfer-Encoding: chunked",), "HTTP/1.0", 400, id="http-1.0-chunked"),
    pytest.param(("Transfer-Encoding: gzip, chunked",), "HTTP/1.1", 501, id="gzip-chunked"),
    pytest.param(
        ("Transfer-Encoding: gzip", "Transfer-Encoding: chunked"), "HTTP/1.1", 501, id="two-fields"
    ),
    pytest.param(("Transfer-Encoding: identity, chunked",), "HTTP/1.1", 501, id="identity-chunked"),
]


@pytest.mark.parametrize(("headers", "version", "status"), REFUSED_CODINGS)
def test_transfer_codings_other_than_chunked_are_refused_and_the_connection_closed(
    proxy: ServedProxy,
    upstream: RecordingUpstream,
    headers: tuple[str, ...],
    version: str,
    status: int,
) -> None:
    """HTTP/1.0 with ``Transfer-Encoding`` is a 400 (RFC 9112 §6.1) and a coding other than
    exactly ``chunked`` a 501 (as nginx answers); either closes the connection, so a request
    pipelined behind it is never parsed, and nothing reaches the upstream."""
    with Client(proxy.url) as client:
        client.send(raw("POST", "/api/echo", *headers, body=BODY, version=version))
        client.send(raw("GET", "/api/echo?smuggled=1"))
        answer = read_until_closed(client)
    line, fields = head_of(answer)
    assert line.startswith(b"HTTP/1.1 %d " % status), line
    assert fields[b"connection"] == b"close"
    assert answer.count(b"HTTP/1.1 ") == 1
    assert upstream.records() == []


def test_exactly_chunked_in_any_case_is_still_accepted(
    proxy: ServedProxy, upstream: RecordingUpstream
) -> None:
    """``Transfer-Encoding: Chunked`` (codings are case-insensitive) is relayed as chunked."""
    with Client(proxy.url) as client:
        reply = client.request(
            "POST", "/api/upload", "Transfer-Encoding: Chunked", body=chunked(b"abc", b"de")
        )
    assert reply.status == 200
    assert reply.json() == {"bytes": 5, "sha256": sha256(b"abcde")}
    assert len(upstream.records()) == 1


TRAVERSAL = [
    "/db/../api/echo",
    "/db/x/../echo",
    "/db/./echo",
    "/db/%2e%2e/api/echo",
    "/db/%2E%2E/api/echo",
    "/db/x%2f..%2fecho",
    "/db/x%2F..%2Fecho",
    "/db/x%5c..%5cecho",
    "/db/x\\..\\echo",
    "/db/echo%00",
    "/db/echo\x00",
    # Double encoding and overlong UTF-8 (checklist C5): an upstream that decodes twice, or
    # reads overlong sequences as ASCII (IIS, old Tomcat), would see '..' or '/'.
    "/db/%252e%252e/api/echo",
    "/db/%252E%252E/api/echo",
    "/db/x%252f..%252fecho",
    "/db/%25%32%65%25%32%65/api/echo",
    "/db/%c0%ae%c0%ae/api/echo",
    "/db/x%c0%afecho",
    "/db/%e0%80%ae%e0%80%ae/api/echo",
    "/db/echo%ff",
]


@pytest.mark.parametrize("target", TRAVERSAL)
def test_traversal_forms_are_refused_before_the_upstream(
    prefixed: ServedProxy, upstream: RecordingUpstream, target: str
) -> None:
    """Each dot-segment, encoded-slash, backslash and NUL form is a 400 and reaches no upstream."""
    with Client(prefixed.url) as client:
        reply = client.request("GET", target)
    assert reply.status == 400
    assert upstream.records() == []


def test_prefix_route_maps_onto_the_upstream_base_path(
    prefixed: ServedProxy, upstream: RecordingUpstream
) -> None:
    """``/db/echo?q`` reaches ``/api/echo?q`` with the query untouched; a path outside every
    prefix is a 404 that reaches no upstream."""
    with Client(prefixed.url) as client:
        reply = client.request("GET", "/db/echo?next=%2Fa%2F..%2Fb&x=1")
        outside = client.request("GET", "/elsewhere/echo")
    assert reply.status == 200
    assert (reply.json()["path"], reply.json()["query"]) == ("/api/echo", "next=%2Fa%2F..%2Fb&x=1")
    assert outside.status == 404
    assert [r.path for r in upstream.records()] == ["/api/echo"]


def test_redirects_are_passed_through_not_followed(
    proxy: ServedProxy, upstream: RecordingUpstream
) -> None:
    """An upstream 302 reaches the client as is, and the proxy never requests its Location."""
    with Client(proxy.url) as client:
        reply = client.request("GET", "/api/redirect")
    assert reply.status == 302
    assert reply.header("location") == "/api/echo"
    assert reply.json() == {"location": "/api/echo"}
    assert [r.path for r in upstream.records()] == ["/api/redirect"]


# -- headers ---------------------------------------------------------------------------------------


def test_request_hop_by_hop_headers_and_client_credentials_are_stripped(
    proxy: ServedProxy, upstream: RecordingUpstream, token: str
) -> None:
    """The upstream sees the injected bearer and end-to-end headers, never the client's
    Authorization, Proxy-Authorization, hop-by-hop headers or headers named in Connection."""
    with Client(proxy.url) as client:
        reply = client.request(
            "GET",
            "/api/echo",
            "Authorization: Basic eDp5",
            "Proxy-Authorization: Basic cHJveHk6cHc=",
            "Connection: X-Foo, Keep-Alive",
            "X-Foo: secret",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Upgrade: websocket",
            "X-Kept: yes",
        )
    assert reply.status == 200
    seen = reply.json()["headers"]
    for name in ("proxy-authorization", "x-foo", "keep-alive", "te", "upgrade"):
        assert name not in seen, name
    assert "x-foo" not in seen.get("connection", "").lower()
    assert seen["authorization"] == f"Bearer {token}"
    assert seen["x-kept"] == "yes"
    [record] = upstream.records()
    assert record.token == token
    assert [n for n, _ in record.headers].count("authorization") == 1
    assert "secret" not in repr(record.headers)
    assert "eDp5" not in repr(record.headers)


def test_connection_header_cannot_strip_the_injected_token(proxy: ServedProxy, token: str) -> None:
    """``Connection: Authorization`` removes the client's credentials, not the injected bearer."""
    with Client(proxy.url) as client:
        reply = client.request(
            "GET", "/api/echo", "Connection: Authorization", "Authorization: Basic eDp5"
        )
    assert reply.status == 200
    assert reply.json()["headers"]["authorization"] == f"Bearer {token}"


def test_x_forwarded_for_is_rebuilt_not_appended(proxy: ServedProxy) -> None:
    """A client's own ``X-Forwarded-For`` is replaced by its real address (checklist D9), so an
    upstream cannot be fooled about who called."""
    with Client(proxy.url) as client:
        reply = client.request("GET", "/api/echo", "X-Forwarded-For: 6.6.6.6")
    assert reply.status == 200
    assert reply.json()["headers"]["x-forwarded-for"] == "127.0.0.1"


def test_response_hop_by_hop_headers_are_stripped(proxy: ServedProxy) -> None:
    """The client never sees the upstream's hop-by-hop headers or those its Connection names;
    end-to-end headers and the body pass."""
    with Client(proxy.url) as client:
        reply = client.request("GET", "/api/hop")
    assert reply.status == 200
    for name in ("x-hop-secret", "keep-alive", "proxy-authenticate", "upgrade", "trailer"):
        assert reply.header(name) is None, name
    assert "x-hop-secret" not in (reply.header("connection") or "").lower()
    assert reply.header("x-end-to-end") == "kept"
    assert reply.json() == {"hop": True}


REWRITE_HEADERS = (
    "X-Original-URL: /admin",
    "X-Rewrite-URL: /admin",
    "X-HTTP-Method-Override: DELETE",
    "X-HTTP-Method: DELETE",
    "X-Method-Override: DELETE",
)


def test_url_rewrite_and_method_override_headers_are_stripped(
    prefixed: ServedProxy, upstream: RecordingUpstream
) -> None:
    """``X-Original-URL``, ``X-Rewrite-URL`` and the method-override headers never reach the
    upstream (frameworks that honour them would leave the route's prefix or its methods);
    the request itself is forwarded as sent."""
    with Client(prefixed.url) as client:
        reply = client.request("GET", "/db/echo", *REWRITE_HEADERS, "X-Kept: yes")
    assert reply.status == 200
    [record] = upstream.records()
    names = {name for name, _ in record.headers}
    for line in REWRITE_HEADERS:
        assert line.split(":")[0].lower() not in names, line
    assert "/admin" not in repr(record.headers)
    assert "DELETE" not in repr(record.headers)
    assert (record.method, record.path, dict(record.headers)["x-kept"]) == (
        "GET",
        "/api/echo",
        "yes",
    )


# -- methods ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [("TRACE", "/api/echo"), ("CONNECT", "127.0.0.1:443"), ("CONNECT", "/api/echo")],
)
def test_trace_and_connect_are_refused_with_405_and_never_forwarded(
    proxy: ServedProxy, upstream: RecordingUpstream, token: str, method: str, target: str
) -> None:
    """TRACE (which an upstream would answer by echoing the injected bearer) and CONNECT get
    the proxy's own 405, as nginx answers; the upstream never sees them and the token
    appears nowhere in the answer."""
    with Client(proxy.url) as client:
        client.send(raw(method, target))
        answer = read_until_closed(client) if method == "CONNECT" else b""
        reply = client.read() if method == "TRACE" else None
    if reply is not None:
        assert reply.status == 405
        assert reply.json()["error"]["code"] == "method_not_allowed"
        answer = bytes(reply.body) + repr(reply.headers).encode()
    else:
        assert head_of(answer)[0].startswith(b"HTTP/1.1 405 "), answer[:80]
    assert token.encode() not in answer
    assert upstream.records() == []


def test_a_method_the_route_does_not_allow_gets_405_with_allow(
    broker: Broker, upstream: RecordingUpstream
) -> None:
    """A route forwards only its ``methods``: others get 405 with an ``Allow`` header naming
    them, on the same connection, and reach no upstream; a route without ``methods`` allows
    GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS only (not PROPFIND)."""
    narrow = {**route(upstream.url + "/api/", "/ro/"), "methods": ["GET", "HEAD"]}
    default = route(upstream.url + "/api/", "/rw/")
    with serve(broker, narrow, default) as proxy, Client(proxy.url) as client:
        post = client.request("POST", "/ro/echo", body=b"x")
        get = client.request("GET", "/ro/echo")
        head = client.request("HEAD", "/ro/echo")
        propfind = client.request("PROPFIND", "/rw/echo")
        put = client.request("PUT", "/rw/echo", body=b"y")
    assert (post.status, post.header("allow")) == (405, "GET, HEAD")
    assert post.json()["error"]["code"] == "method_not_allowed"
    assert (get.status, head.status, put.status) == (200, 200, 200)
    assert propfind.status == 405
    assert propfind.header("allow") == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert [(r.method, r.path) for r in upstream.records()] == [
        ("GET", "/api/echo"),
        ("HEAD", "/api/echo"),
        ("PUT", "/api/echo"),
    ]


def test_consumer_key_header_is_required_and_never_forwarded(
    auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """With ``consumer_header`` set, a missing or unknown key is a 401 that reaches no upstream;
    a valid key passes and is not forwarded."""
    key = new_key()
    config = {
        "store": "memory",
        "providers": {"svc": client_credentials(auth_server)},
        "consumers": {"etl": {"api_key_sha256": hash_key(key), "allow": ["svc"]}},
    }
    with (
        Broker(parse_settings(yaml.safe_dump(config), {})) as broker,
        serve(broker, route(upstream.url), consumer_header="X-Tokenbroker-Key") as proxy,
    ):
        token = broker.get_token("svc").access_token
        statuses = []
        for headers in ((), ("X-Tokenbroker-Key: " + "tbk_" + "x" * 43,)):
            with Client(proxy.url) as client:
                statuses.append(client.request("GET", "/api/echo", *headers).status)
        assert upstream.records() == []
        with Client(proxy.url) as client:
            reply = client.request("GET", "/api/echo", f"X-Tokenbroker-Key: {key}")
    assert statuses == [401, 401]
    assert reply.status == 200
    seen = reply.json()["headers"]
    assert "x-tokenbroker-key" not in seen
    assert seen["authorization"] == f"Bearer {token}"
    [record] = upstream.records()
    assert key not in repr(record.headers)


def test_consumer_acl_checks_the_route_scope(
    auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """The proxy's ACL checks the scopes the route's tokens are asked for (configured ``read``
    when the route names none): svc:read may use the ``read`` route, not the ``read write``
    one; svc:write may use neither; the token requests ask for exactly those scopes. A
    forbidden route's 404 is byte for byte a missing route's, in words true of both."""
    keys = {"reader": new_key(), "writer": new_key()}
    allow = {"reader": "svc:read", "writer": "svc:write"}
    config = {
        "store": "memory",
        "providers": {"svc": client_credentials(auth_server)},
        "consumers": {
            name: {"api_key_sha256": hash_key(key), "allow": [allow[name]]}
            for name, key in keys.items()
        },
    }
    narrow = route(f"{upstream.url}/api/", "/narrow/")
    wide = {**route(f"{upstream.url}/api/", "/wide/"), "scope": " write read "}
    statuses = {}
    refusals = set()
    with (
        Broker(parse_settings(yaml.safe_dump(config), {})) as broker,
        serve(broker, narrow, wide, consumer_header="X-Key") as proxy,
    ):
        for name, key in keys.items():
            for path in ("/narrow/echo", "/wide/echo", "/nowhere/echo"):
                with Client(proxy.url) as client:
                    reply = client.request("GET", path, f"X-Key: {key}")
                statuses[name, path] = reply.status
                if reply.status == 404:
                    refusals.add(bytes(reply.body))
    assert statuses == {
        ("reader", "/narrow/echo"): 200,
        ("reader", "/wide/echo"): 404,
        ("writer", "/narrow/echo"): 404,
        ("writer", "/wide/echo"): 404,
        ("reader", "/nowhere/echo"): 404,
        ("writer", "/nowhere/echo"): 404,
    }
    [refusal] = refusals
    assert json.loads(refusal)["error"] == {
        "code": "no_route",
        "message": "no route serves this path for this key",
    }
    assert len(upstream.records()) == 1
    asked = [r.form.get("scope") for r in auth_server.requests if r.grant == "client_credentials"]
    assert asked == ["read"]


def test_wrong_consumer_keys_are_throttled_per_address_and_a_valid_key_still_passes(
    auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """200 wrong keys from one address: the first 10 get 401, the rest 429 with
    ``Retry-After`` (the API's failed-key limit, :mod:`tokenbroker.edge.ratelimit`); a request
    without a key is not counted; a valid key from that address is still served; the
    upstream sees only the valid one."""
    key = new_key()
    config = {
        "store": "memory",
        "providers": {"svc": client_credentials(auth_server)},
        "consumers": {"etl": {"api_key_sha256": hash_key(key), "allow": ["svc"]}},
    }
    with (
        Broker(parse_settings(yaml.safe_dump(config), {})) as broker,
        serve(broker, route(upstream.url), consumer_header="X-Key") as proxy,
        Client(proxy.url) as client,
    ):
        replies = [
            client.request("GET", "/api/echo", f"X-Key: tbk_wrong{i:038d}") for i in range(200)
        ]
        keyless = client.request("GET", "/api/echo")
        valid = client.request("GET", "/api/echo", f"X-Key: {key}")
    statuses = [r.status for r in replies]
    assert statuses == [401] * 10 + [429] * 190
    assert all(1 <= int(r.header("retry-after") or 0) <= 60 for r in replies[10:])
    assert {r.json()["error"]["code"] for r in replies[10:]} == {"rate_limited"}
    assert keyless.status == 401
    assert valid.status == 200
    assert [r.path for r in upstream.records()] == ["/api/echo"]


# -- curl ------------------------------------------------------------------------------------------


def curl(*args: str | Path) -> tuple[list[int], Reply]:
    """Run ``curl -sS -i --http1.1 ARGS``; return every response's status and the last response."""
    assert CURL is not None
    done = subprocess.run(
        [CURL, "-sS", "-i", "--http1.1", "--max-time", "60", *map(str, args)],
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    out, statuses = done.stdout, []
    while True:
        head, _, out = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        statuses.append(int(lines[0].split()[1]))
        if statuses[-1] >= 200:
            break
    fields = [line.partition(":") for line in lines[1:]]
    headers = [(name.strip().lower(), value.strip()) for name, _, value in fields]
    return statuses, Reply(statuses[-1], headers, bytearray(out))


@needs_curl
def test_curl_get(proxy: ServedProxy, token: str) -> None:
    """curl GET through the proxy: 200 and the upstream saw the injected bearer."""
    statuses, reply = curl(f"{proxy.url}/api/echo?via=curl")
    assert statuses == [200]
    assert reply.json()["query"] == "via=curl"
    assert reply.json()["headers"]["authorization"] == f"Bearer {token}"


@needs_curl
def test_curl_post_form_file(proxy: ServedProxy, tmp_path: Path) -> None:
    """curl ``-d @file`` with 1 MiB reaches the upstream whole."""
    body = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 30000)[: 1 << 20]  # -d drops CR and LF
    path = tmp_path / "form.txt"
    path.write_bytes(body)
    statuses, reply = curl("-d", f"@{path}", f"{proxy.url}/api/upload")
    assert statuses[-1] == 200
    assert reply.json() == {"bytes": len(body), "sha256": sha256(body)}


@needs_curl
def test_curl_chunked_upload(proxy: ServedProxy, tmp_path: Path) -> None:
    """curl's chunked upload of 1 MiB reaches the upstream whole."""
    body = pattern(1 << 20)
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    statuses, reply = curl(
        "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}", f"{proxy.url}/api/upload"
    )
    assert statuses[-1] == 200
    assert reply.json() == {"bytes": len(body), "sha256": sha256(body)}


@needs_curl
def test_curl_head(proxy: ServedProxy) -> None:
    """curl -I gets the headers of a 5000-byte download and no body."""
    statuses, reply = curl("-I", f"{proxy.url}/api/download?bytes=5000")
    assert statuses == [200]
    assert reply.header("content-length") == "5000"
    assert reply.body == b""


@needs_curl
def test_curl_expect_100_continue(proxy: ServedProxy, tmp_path: Path) -> None:
    """curl with ``Expect: 100-continue`` gets ``100 Continue`` and then the upload's answer."""
    body = pattern(4096)
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    statuses, reply = curl(
        "-H", "Expect: 100-continue", "--data-binary", f"@{path}", f"{proxy.url}/api/upload"
    )
    assert statuses == [100, 200]
    assert reply.json() == {"bytes": len(body), "sha256": sha256(body)}


@needs_curl
def test_curl_reuses_one_connection_for_several_urls(
    proxy: ServedProxy, upstream: RecordingUpstream, tmp_path: Path, token: str
) -> None:
    """Three URLs in one curl run use one client connection and one upstream connection."""
    assert CURL is not None
    args: list[str] = []
    for i in range(3):
        args += ["-o", str(tmp_path / f"{i}.json"), f"{proxy.url}/api/echo?i={i}"]
    done = subprocess.run(
        [CURL, "-sS", "--http1.1", "--max-time", "60", "-w", "%{num_connects}\n", *args],
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.split() == [b"1", b"0", b"0"]
    for i in range(3):
        echo = json.loads((tmp_path / f"{i}.json").read_bytes())
        assert (echo["query"], echo["headers"]["authorization"]) == (f"i={i}", f"Bearer {token}")
    assert len(upstream.records()) == 3
    assert upstream.connections_accepted == 1
