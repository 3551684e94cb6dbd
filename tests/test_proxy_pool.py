"""The proxy's pool mode: one account per client connection, FIFO waiters, re-login on 401.

Everything runs on real sockets: the test authorization server, a
:class:`~tokenbroker.testing.RecordingUpstream` that accepts only tokens the
authorization server still honours, and the proxy (``ServedProxy``) between the
clients and the upstream. What is asserted is what the upstream and the authorization
server saw. The first section checks the recording upstream itself.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import POOL_ACCOUNTS, BrokerFactory
from support import BROKEN_BODIES, CHUNKED_HEAD, login, wait_for
from tokenbroker import Broker
from tokenbroker.config import ProxySettings
from tokenbroker.testing import AuthorizationServer, RecordingUpstream, ServedProxy

ACCOUNTS = POOL_ACCOUNTS
DEADLINE = 10.0


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One keep-alive client connection that never reconnects behind the test's back."""

    def __init__(self, url: str, name: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        self.name = name
        self.http = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.http.connect()
        self.http.auto_open = 0  # a closed socket raises NotConnected instead of redialling

    def send(
        self,
        method: str = "GET",
        path: str = "/api/echo",
        body: bytes | Iterable[bytes] | None = None,
    ) -> None:
        headers = {"X-Client": self.name, "Authorization": "Bearer client-supplied"}
        chunked = body is not None and not isinstance(body, bytes)
        self.http.request(method, path, body=body, headers=headers, encode_chunked=chunked)

    def receive(self) -> Reply:
        response = self.http.getresponse()
        return Reply(response.status, response.headers, response.read())

    def call(
        self,
        method: str = "GET",
        path: str = "/api/echo",
        body: bytes | Iterable[bytes] | None = None,
    ) -> Reply:
        self.send(method, path, body)
        return self.receive()

    def fileno(self) -> int:
        assert self.http.sock is not None
        return int(self.http.sock.fileno())

    def close(self) -> None:
        self.http.close()


def first_readable(clients: list[Client], timeout: float = DEADLINE) -> list[Client]:
    """Wait until at least one of ``clients`` has a response to read; return those that do."""
    readable, _, _ = select.select(clients, [], [], timeout)
    assert readable, f"no response within {timeout} s"
    return readable


def tokens_by_client(upstream: RecordingUpstream) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for record in upstream.records():
        seen.setdefault(record.client, set()).add(record.token)
    return seen


def last_token(upstream: RecordingUpstream, client: str) -> str:
    return [r.token for r in upstream.records() if r.client == client][-1]


def idle(proxy: ServedProxy) -> bool:
    stats = proxy.stats(prefix="/")
    return (stats.available, stats.in_use, stats.waiting) == (stats.total, 0, 0)


def proxy_settings(upstream: RecordingUpstream, **overrides: Any) -> ProxySettings:
    route = {"prefix": "/", "upstream": upstream.url, "provider": "db", "mode": "pool"}
    return ProxySettings.model_validate(
        {"listen": "127.0.0.1:0", "health_listen": "127.0.0.1:0", "routes": [route], **overrides}
    )


@pytest.fixture
def broker(pool_broker: Broker) -> Broker:
    """A broker with a login provider ``db`` over the accounts alice, bob and carol."""
    return pool_broker


@pytest.fixture
def upstream(auth_server: AuthorizationServer) -> Iterator[RecordingUpstream]:
    """A recording upstream that accepts only tokens ``auth_server`` honours now."""
    with RecordingUpstream(auth_server) as server:
        yield server


@pytest.fixture
def proxy(broker: Broker, upstream: RecordingUpstream) -> Iterator[ServedProxy]:
    """The proxy with one pool route ``/`` to ``upstream`` (every account logged in)."""
    with ServedProxy(broker, proxy_settings(upstream)) as served:
        yield served


@pytest.fixture
def clients() -> Iterator[Callable[[str, str], Client]]:
    """Open client connections; each is closed after the test."""
    opened: list[Client] = []

    def factory(url: str, name: str) -> Client:
        client = Client(url, name)
        opened.append(client)
        return client

    yield factory
    for client in opened:
        client.close()


# -- the recording upstream on its own ------------------------------------------------------


def test_upstream_accepts_only_live_tokens_and_records_every_request(
    auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """/api/ answers 200 for a live login token, 401 for a revoked or missing one; all recorded."""
    token = httpx.post(auth_server.login_url, json={"username": "alice", "password": "alice-pw"})
    live = token.json()["data"]["token"]
    with httpx.Client(base_url=upstream.url, headers={"X-Client": "t"}) as client:
        ok = client.get("/api/echo?x=1", headers={"Authorization": f"Bearer {live}"})
        auth_server.revoke_access_token(live)
        revoked = client.get("/api/echo", headers={"Authorization": f"Bearer {live}"})
        missing = client.post("/api/upload", content=b"abc")
        closing = client.get(
            "/api/nope", headers={"Authorization": "Bearer x", "Connection": "close"}
        )
        after = client.get("/api/echo", headers={"Authorization": f"Bearer {live}"})
    assert ok.status_code == 200
    assert ok.json()["query"] == "x=1"
    assert ok.json()["headers"]["x-client"] == "t"
    assert [revoked.status_code, missing.status_code, after.status_code] == [401, 401, 401]
    assert revoked.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert revoked.json() == {"error": "invalid_token"}
    assert closing.status_code == 401  # the 404 route is behind the same bearer check
    assert closing.headers["connection"] == "close"
    records = upstream.records()
    assert [(r.client, r.token, r.method, r.path, r.connection) for r in records] == [
        ("t", live, "GET", "/api/echo", 1),
        ("t", live, "GET", "/api/echo", 1),
        ("t", "", "POST", "/api/upload", 1),
        ("t", "x", "GET", "/api/nope", 1),
        ("t", live, "GET", "/api/echo", 2),
    ]
    assert ("x-client", "t") in records[0].headers
    assert upstream.connections_accepted == 2
    upstream.reset()
    assert (upstream.records(), upstream.connections_accepted) == ([], 0)


def test_upstream_streams_bodies_and_frames_downloads() -> None:
    """Upload hashes a chunked body; download is i % 251 with Content-Length or chunked; HEAD has no body."""
    size = 3 * 65536 + 7
    expected = bytes(i % 251 for i in range(size))
    piece = b"\x01" * 65536
    with (
        RecordingUpstream() as upstream,
        httpx.Client(base_url=upstream.url, headers={"Authorization": "Bearer any"}) as client,
    ):
        upload = client.put("/api/upload", content=iter([piece] * 16))
        plain = client.get("/api/download", params={"bytes": size})
        chunked = client.get("/api/download", params={"bytes": size, "chunked": 1})
        head = client.head("/api/download", params={"bytes": size})
        no_content = client.get("/api/status/204")
        trailers = client.get("/api/trailers")
    assert upload.json() == {"bytes": 16 * 65536, "sha256": hashlib.sha256(piece * 16).hexdigest()}
    assert plain.content == expected
    assert plain.headers["content-length"] == str(size)
    assert chunked.content == expected
    assert chunked.headers["transfer-encoding"] == "chunked"
    assert (head.headers["content-length"], head.content) == (str(size), b"")
    assert (no_content.status_code, no_content.content) == (204, b"")
    assert "content-length" not in no_content.headers
    assert trailers.content == b"trailer-body"
    assert upstream.connections_accepted == 1


def test_upstream_reset_mid_sends_ten_bytes_then_a_tcp_reset() -> None:
    """/api/reset-mid promises 1000 bytes, sends 10, then the connection is reset (not closed)."""
    received = b""
    with (
        RecordingUpstream() as upstream,
        socket.create_connection(("127.0.0.1", upstream.port)) as sock,
    ):
        sock.settimeout(DEADLINE)
        sock.sendall(b"GET /api/reset-mid HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head
    assert body == b"0123456789"


# -- the proxy's pool mode ------------------------------------------------------------------


def test_connections_never_share_an_account_while_open(
    proxy: ServedProxy,
    upstream: RecordingUpstream,
    auth_server: AuthorizationServer,
) -> None:
    """10 connections x 20 keep-alive requests on 3 accounts: live tokens, one per connection, never shared while open."""
    spans: dict[str, tuple[float, float]] = {}
    statuses: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(10)

    def connection(name: str) -> None:
        try:
            client = Client(proxy.url, name)
            try:
                barrier.wait(DEADLINE)
                statuses[name] = [client.call().status]
                first = time.monotonic()
                statuses[name] += [client.call().status for _ in range(19)]
                spans[name] = (first, time.monotonic())
            finally:
                client.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=connection, args=(f"c{i}",)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert errors == []
    assert statuses == {f"c{i}": [200] * 20 for i in range(10)}

    records = upstream.records()
    assert len(records) == 200
    assert {r.token for r in records} <= set(auth_server.issued_login_tokens)
    tokens = tokens_by_client(upstream)
    assert all(len(used) == 1 for used in tokens.values()), tokens
    token = {client: next(iter(used)) for client, used in tokens.items()}
    assert len(set(token.values())) == 3
    for a, b in itertools.combinations(sorted(spans), 2):
        overlap = spans[a][0] <= spans[b][1] and spans[b][0] <= spans[a][1]
        if overlap:
            assert token[a] != token[b], f"{a} and {b} were open together on one account"
    edges = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    assert max(itertools.accumulate(step for _, step in edges)) <= 3
    assert auth_server.count("login") == 3
    wait_for(lambda: idle(proxy), "every account back in the pool")
    assert sum(c.uses for c in proxy.stats(prefix="/").credentials) == 200


def test_waiting_connections_are_served_in_fifo_order(
    proxy: ServedProxy,
    upstream: RecordingUpstream,
    auth_server: AuthorizationServer,
    clients: Callable[[str, str], Client],
) -> None:
    """Connections queued behind 3 holders get an account in the order they asked, one per release."""
    holders = [clients(proxy.url, f"holder{i}") for i in range(3)]
    for holder in holders:
        assert holder.call().status == 200
    waiters: list[Client] = []
    for i in range(4):
        waiter = clients(proxy.url, f"waiter{i}")
        waiter.send()
        waiters.append(waiter)
        wait_for(lambda n=i + 1: proxy.stats(prefix="/").waiting == n, f"{i + 1} queued")
    health = httpx.get(proxy.health_url + "/health").json()
    assert {k: health["pool"][k] for k in ("total", "in_use", "available", "waiting")} == {
        "total": 3,
        "in_use": 3,
        "available": 0,
        "waiting": 4,
    }

    served: list[Client] = []
    pending = list(waiters)
    releases = [*holders, None]
    for release in releases:
        (release or served[0]).close()
        ready = first_readable(pending)
        assert len(ready) == 1, [c.name for c in ready]
        assert ready[0].receive().status == 200
        served.append(ready[0])
        pending.remove(ready[0])

    assert [c.name for c in served] == ["waiter0", "waiter1", "waiter2", "waiter3"]
    handed = [last_token(upstream, f"holder{i}") for i in range(3)]
    handed.append(handed[0])  # waiter3 got the account waiter0 released
    assert [last_token(upstream, f"waiter{i}") for i in range(4)] == handed
    for client in served:
        client.close()
    wait_for(lambda: idle(proxy), "every account back in the pool")
    assert auth_server.count("login") == 3


@pytest.mark.parametrize("hang_up", ["close", "reset"])
def test_queued_connection_that_disconnects_takes_no_account(
    hang_up: str,
    proxy: ServedProxy,
    upstream: RecordingUpstream,
    clients: Callable[[str, str], Client],
) -> None:
    """A client that hangs up (FIN or RST) while queued leaves the queue; the next freed account serves a newcomer."""
    holders = [clients(proxy.url, f"holder{i}") for i in range(3)]
    for holder in holders:
        assert holder.call().status == 200
    gone = clients(proxy.url, "gone")
    gone.send()
    wait_for(lambda: proxy.stats(prefix="/").waiting == 1, "the client to queue")
    if hang_up == "reset":
        assert gone.http.sock is not None
        gone.http.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.close()
    wait_for(lambda: proxy.stats(prefix="/").waiting == 0, "the closed client to leave the queue")

    holders[0].close()
    wait_for(lambda: proxy.stats(prefix="/").available == 1, "the released account to be free")
    late = clients(proxy.url, "late")
    assert late.call().status == 200
    assert last_token(upstream, "late") == last_token(upstream, "holder0")
    assert "gone" not in tokens_by_client(upstream)
    for client in (late, *holders[1:]):
        client.close()
    wait_for(lambda: idle(proxy), "every account back in the pool")


def test_upstream_401_relogs_that_account_and_retries_once(
    proxy: ServedProxy,
    upstream: RecordingUpstream,
    auth_server: AuthorizationServer,
    clients: Callable[[str, str], Client],
) -> None:
    """A revoked token: one re-login of that account, one retry with the new token and the same body; others untouched."""
    a, b = clients(proxy.url, "a"), clients(proxy.url, "b")
    assert a.call().status == 200
    assert b.call().status == 200
    old, other = last_token(upstream, "a"), last_token(upstream, "b")
    assert old != other
    logins = auth_server.count("login")
    auth_server.revoke_access_token(old)
    mark = len(upstream.records())

    body = b"replayable " * 10
    reply = a.call("POST", "/api/echo", body)

    assert reply.status == 200
    attempts = [r for r in upstream.records()[mark:] if r.client == "a"]
    assert [r.token for r in attempts][:1] == [old]
    assert len(attempts) == 2
    new = attempts[1].token
    assert new not in (old, other)
    assert new in auth_server.issued_login_tokens
    echo = reply.json()
    assert echo["headers"]["authorization"] == f"Bearer {new}"
    assert (echo["body_bytes"], echo["body_sha256"]) == (
        len(body),
        hashlib.sha256(body).hexdigest(),
    )
    assert auth_server.count("login") == logins + 1

    assert b.call().status == 200
    assert last_token(upstream, "b") == other
    assert a.call().status == 200
    assert last_token(upstream, "a") == new
    assert auth_server.count("login") == logins + 1
    credentials = proxy.stats(prefix="/").credentials
    assert sorted(c.refreshes for c in credentials) == [1, 1, 2]
    assert sum(c.errors for c in credentials) == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_upstream_401_on_a_body_over_the_replay_limit_is_passed_through(
    framing: str,
    broker: Broker,
    upstream: RecordingUpstream,
    auth_server: AuthorizationServer,
    clients: Callable[[str, str], Client],
) -> None:
    """A 4 KiB body (limit 1 KiB) meeting a 401 is not retried: the client gets the 401; the next request re-logs in."""
    settings = proxy_settings(upstream, replay_body_bytes=1024)
    with ServedProxy(broker, settings) as proxy:
        a = clients(proxy.url, "a")
        assert a.call().status == 200
        old = last_token(upstream, "a")
        logins = auth_server.count("login")
        auth_server.revoke_access_token(old)
        mark = len(upstream.records())

        body = bytes(4096)
        reply = a.call("POST", "/api/upload", body if framing == "content-length" else [body])

        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert reply.json() == {"error": "invalid_token"}
        attempts = [(r.token, r.method, r.path) for r in upstream.records()[mark:]]
        assert attempts == [(old, "POST", "/api/upload")]

        assert a.call().status == 200
        assert last_token(upstream, "a") not in ("", old)
        assert auth_server.count("login") == logins + 1
        a.close()
        wait_for(lambda: idle(proxy), "every account back in the pool")


# -- a request body that breaks off --------------------------------------------------------


def send_broken_body(url: str, upstream: RecordingUpstream, name: str) -> None:
    """Send a chunked POST whose body breaks off (see BROKEN_BODIES), then hang up: the
    upstream has the head and waits for the rest of the body when the bad bytes come."""
    coding, rest = BROKEN_BODIES[name]
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=DEADLINE) as sock:
        sock.sendall(CHUNKED_HEAD % coding)
        if coding == b"chunked":  # (xchunked is refused before anything is forwarded)
            wait_for(lambda: len(upstream.records()) == 1, "the upstream to read the head")
        sock.sendall(rest)


@pytest.mark.parametrize("name", list(BROKEN_BODIES))
def test_a_broken_request_body_frees_the_account_and_the_upstream_connection(
    auth_server: AuthorizationServer,
    upstream: RecordingUpstream,
    make_broker: BrokerFactory,
    name: str,
) -> None:
    """With one account, a client whose chunked body is malformed (or ends with the connection)
    and who then hangs up neither keeps the account nor the upstream connection: the next
    client is served at once, and the upstream sees the half-sent request's connection close."""
    one = make_broker(
        {"db": login(auth_server, credentials=[{"username": "alice", "password": "alice-pw"}])}
    )
    with ServedProxy(one, proxy_settings(upstream)) as proxy:
        send_broken_body(proxy.url, upstream, name)
        after = Client(proxy.url, "after")
        after.http.sock.settimeout(5)
        try:
            reply = after.call()
        except TimeoutError:
            pytest.fail("the next client waited: the broken request kept the only account")
        finally:
            after.close()
        assert reply.status == 200
        broken = [r.connection for r in upstream.records() if r.client == "broken"]
        wait_for(
            lambda: not set(broken) & upstream.open_connections,
            "the upstream to see the broken request's connection close",
        )
        wait_for(lambda: idle(proxy), "the account back in the pool")
    assert [r.client for r in upstream.records()] == ["broken"] * len(broken) + ["after"]


def test_upstream_401s_relog_an_account_at_most_once_per_cooldown(
    proxy: ServedProxy,
    upstream: RecordingUpstream,
    auth_server: AuthorizationServer,
    clients: Callable[[str, str], Client],
) -> None:
    """Each new token of one account revoked at once: within the invalidate cooldown the proxy
    re-logs that account in once; the later 401s reach the client instead of more logins."""
    a = clients(proxy.url, "a")
    assert a.call().status == 200
    logins = auth_server.count("login")
    statuses = []
    for _ in range(5):
        auth_server.revoke_access_token(last_token(upstream, "a"))
        statuses.append(a.call().status)
    assert statuses == [200, 401, 401, 401, 401]
    assert auth_server.count("login") == logins + 1
    a.close()
    wait_for(lambda: idle(proxy), "every account back in the pool")


# -- leases held by idle, waiting, trickling and non-reading clients (issue 14) ---------------


def one_account_proxy(
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    upstream: RecordingUpstream,
    route: dict[str, Any] | None = None,
    **overrides: Any,
) -> ServedProxy:
    """A proxy whose only pool route leases the one account alice (limits as given, with a
    tick of 0.1 s so that they are applied promptly)."""
    one = make_broker(
        {"db": login(auth_server, credentials=[{"username": "alice", "password": "alice-pw"}])}
    )
    spec = {
        "prefix": "/",
        "upstream": upstream.url,
        "provider": "db",
        "mode": "pool",
        **(route or {}),
    }
    settings = ProxySettings.model_validate(
        {"listen": "127.0.0.1:0", "refresh_check_seconds": 0.1, "routes": [spec], **overrides}
    )
    return ServedProxy(one, settings)


def raw_socket(url: str, *, receive_buffer: int | None = None) -> socket.socket:
    """A client socket to ``url``; a small ``receive_buffer`` makes a non-reading client
    back the proxy's writes up sooner."""
    parts = urlsplit(url)
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(DEADLINE)
    sock.connect((parts.hostname, parts.port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Read until the proxy closes the connection."""
    data = b""
    while piece := sock.recv(65536):
        data += piece
    return data


def served_within(url: str, name: str, seconds: float) -> tuple[Reply, float]:
    """One request on a new connection, which must be answered within ``seconds``; the
    reply and how long it took."""
    client = Client(url, name)
    assert client.http.sock is not None
    client.http.sock.settimeout(seconds)
    started = time.monotonic()
    try:
        reply = client.call()
    except TimeoutError:
        pytest.fail(f"{name} was not served within {seconds} s: the only account stayed leased")
    finally:
        client.close()
    return reply, time.monotonic() - started


def test_an_idle_connection_gives_its_account_to_a_waiter_and_is_closed(
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    upstream: RecordingUpstream,
    clients: Callable[[str, str], Client],
) -> None:
    """With one account, a connection idle for idle_timeout_seconds is closed and the
    waiting client is served at once with the same account."""
    with one_account_proxy(
        auth_server, make_broker, upstream, {"idle_timeout_seconds": 0.5}
    ) as proxy:
        holder = clients(proxy.url, "holder")
        assert holder.call().status == 200
        reply, waited = served_within(proxy.url, "waiter", 10)
        assert reply.status == 200
        assert last_token(upstream, "waiter") == last_token(upstream, "holder")
        assert holder.http.sock is not None
        holder.http.sock.settimeout(DEADLINE)
        assert holder.http.sock.recv(1) == b""  # the proxy closed the idle connection
        wait_for(lambda: idle(proxy), "the account back in the pool")
    assert 0.4 < waited < 5


def test_a_waiter_gets_503_pool_exhausted_with_retry_after_after_wait_timeout(
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    upstream: RecordingUpstream,
    clients: Callable[[str, str], Client],
) -> None:
    """A client waiting wait_timeout_seconds for the only (busy) account gets 503
    pool_exhausted + Retry-After, takes no account, and the holder keeps its own."""
    with one_account_proxy(
        auth_server,
        make_broker,
        upstream,
        {"wait_timeout_seconds": 0.5},
        retry_after_seconds=3,
    ) as proxy:
        holder = clients(proxy.url, "holder")
        assert holder.call().status == 200
        waiter = clients(proxy.url, "waiter")
        started = time.monotonic()
        reply = waiter.call()
        waited = time.monotonic() - started
        assert proxy.stats().waiting == 0
        assert holder.call().status == 200
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "pool_exhausted"
    assert reply.headers["Retry-After"] == "3"
    assert 0.4 < waited < 5
    assert [r.client for r in upstream.records()] == ["holder", "holder"]


@pytest.mark.parametrize("size", [100, 1 << 20], ids=["kept-body", "streamed-body"])
def test_a_trickled_request_body_gets_408_at_the_request_timeout_and_frees_the_account(
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    upstream: RecordingUpstream,
    size: int,
) -> None:
    """A body sent a byte every 0.1 s (never silent for client_body_timeout_seconds) gets
    408 and a close once client_request_timeout_seconds have passed since the request
    began, and the only account serves the next client at once."""
    with one_account_proxy(
        auth_server,
        make_broker,
        upstream,
        client_request_timeout_seconds=1.0,
        client_body_timeout_seconds=30,
    ) as proxy:
        with raw_socket(proxy.url) as sock:
            started = time.monotonic()
            sock.sendall(
                b"PUT /api/upload HTTP/1.1\r\nHost: x\r\nX-Client: trickle\r\n"
                b"Content-Length: %d\r\n\r\n" % size
            )
            wait_for(lambda: proxy.stats().in_use == 1, "the trickling client to lease")
            sent = 0
            while not select.select([sock], [], [], 0.1)[0]:
                assert time.monotonic() - started < 8, "the trickled request was never cut off"
                sock.sendall(b"x")
                sent += 1
            waited = time.monotonic() - started
            reply = read_all(sock)
        after, took = served_within(proxy.url, "after", 5)
        wait_for(lambda: idle(proxy), "the account back in the pool")
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in reply.lower()
    assert sent < size
    assert 0.9 < waited < 5
    assert after.status == 200
    assert took < 5


def test_a_client_that_stops_reading_is_closed_after_the_send_timeout_and_frees_the_account(
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    upstream: RecordingUpstream,
) -> None:
    """A client that never reads a 64 MiB download is dropped client_send_timeout_seconds
    after the proxy's writes back up: the only account serves the next client at once and
    the upstream connection of the download is closed."""
    with one_account_proxy(
        auth_server, make_broker, upstream, client_send_timeout_seconds=0.5
    ) as proxy:
        with raw_socket(proxy.url, receive_buffer=4096) as stuck:
            stuck.sendall(
                b"GET /api/download?bytes=%d HTTP/1.1\r\nHost: x\r\nX-Client: stuck\r\n\r\n"
                % (64 << 20)
            )
            wait_for(lambda: len(upstream.records()) == 1, "the download to start")
            after, took = served_within(proxy.url, "after", 8)
            (download,) = [r.connection for r in upstream.records() if r.client == "stuck"]
            wait_for(
                lambda: download not in upstream.open_connections,
                "the upstream connection of the download to close",
            )
        wait_for(lambda: idle(proxy), "the account back in the pool")
    assert after.status == 200
    assert took < 8
    assert [r.client for r in upstream.records()] == ["stuck", "after"]


def test_a_client_reading_slowly_is_not_cut_off_by_the_send_timeout(
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    upstream: RecordingUpstream,
) -> None:
    """client_send_timeout_seconds bounds each silence, not the whole response (as nginx's
    send_timeout): a client pausing 0.5 s five times (2.5 s in all, past the 2 s limit)
    while reading 32 MiB gets every byte."""
    size = 32 << 20
    with (
        one_account_proxy(
            auth_server, make_broker, upstream, client_send_timeout_seconds=2.0
        ) as proxy,
        raw_socket(proxy.url, receive_buffer=4096) as slow,
    ):
        slow.sendall(
            b"GET /api/download?bytes=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size
        )
        buffer = memoryview(bytearray(1 << 20))
        start, total = b"", 0  # counted, not kept: the reader must stay fast between pauses
        for pause in range(6):
            if pause < 5:
                time.sleep(0.5)  # the pause under test, each shorter than the limit
            goal = total + (4 << 20) if pause < 5 else size << 1
            while total < goal and (count := slow.recv_into(buffer)):
                if len(start) < 1024:
                    start += bytes(buffer[:count])
                total += count
    head = start.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200 ")
    assert total - len(head) - 4 == size
