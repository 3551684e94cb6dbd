"""The API's uvicorn protocol bounds how long a request may take to arrive: a silent body or a
trickled request gets 408 and the connection closes; a real `serve` process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from support import (
    CLIENT_ID,
    CLIENT_SECRET,
    client_credentials,
    free_port,
    serve_process,
)
from tokenbroker.edge.statuses import REQUEST_TIMEOUT
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.testing import AuthorizationServer, Fault

KEY = new_key()
SILENCE = 1.0  # server.client_body_timeout_seconds
TOTAL = 3.0  # server.client_request_timeout_seconds
# The machine is shared and loaded: a bound is met if the close comes within this much after it.
SLACK = 4.0
# How long a test waits for an answer before calling the connection "still open".
GIVE_UP = 15.0
BODY = 60_000
HEAD = (
    b"POST /v1/tokens/svc/invalidate HTTP/1.1\r\nHost: x\r\n"
    b"Authorization: Bearer " + KEY.encode() + b"\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
)


@pytest.fixture(scope="module")
def idp() -> Iterator[AuthorizationServer]:
    """One authorization server for the module's `serve` process."""
    server = AuthorizationServer(expires_in=3600)
    server.add_client(CLIENT_ID, CLIENT_SECRET, scopes=["read"])
    with server:
        yield server


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, idp: AuthorizationServer) -> Iterator[str]:
    """`tokenbroker serve` with 1 s of body silence and 3 s per request allowed; its URL."""
    port = free_port()
    path = tmp_path_factory.mktemp("api") / "tokenbroker.yaml"
    config = {
        "store": "memory",
        "providers": {"svc": client_credentials(idp)},
        "consumers": {"app": {"api_key_sha256": hash_key(KEY), "allow": ["svc"]}},
        "server": {
            "listen": f"127.0.0.1:{port}",
            "client_body_timeout_seconds": SILENCE,
            "client_request_timeout_seconds": TOTAL,
        },
        "telemetry": {"log_level": "warning"},
    }
    with serve_process(path, config, timeout=30) as served:
        yield served.url


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=GIVE_UP)


def _until_closed(sock: socket.socket, started: float, drip: bytes = b"") -> tuple[bytes, float]:
    """Read until the server closes (sending one byte of ``drip`` every 0.5 s meanwhile); return
    what it sent and the seconds from ``started`` to the close. Fails if it is still open after
    :data:`GIVE_UP` seconds."""
    reply = b""
    while time.monotonic() - started < GIVE_UP:
        if select.select([sock], [], [], 0.5)[0]:
            try:
                chunk = sock.recv(65_536)
            except ConnectionResetError:  # closed with our drip unread
                chunk = b""
            if not chunk:
                return reply, time.monotonic() - started
            reply += chunk
        elif drip:
            with contextlib.suppress(OSError):  # already closed: the next read sees it
                sock.send(drip[:1])
            drip = drip[1:]
    raise AssertionError(f"still open after {GIVE_UP} s; the server sent {reply[:200]!r}")


def _answers(reply: bytes) -> list[tuple[int, dict[str, object]]]:
    """The status and JSON body of each response in ``reply`` (Content-Length framed)."""
    found = []
    while reply:
        head, _, rest = reply.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        size = int(headers["content-length"])
        found.append((int(lines[0].split()[1]), json.loads(rest[:size])))
        reply = rest[size:]
    return found


def _assert_timed_out(reply: bytes) -> None:
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in head
    assert b"cache-control: no-store" in head
    [(status, body)] = _answers(reply)
    assert status == 408
    assert body == {"error": {"code": REQUEST_TIMEOUT.code, "message": REQUEST_TIMEOUT.message}}
    assert REQUEST_TIMEOUT.code == "request_timeout"


def test_a_silent_body_gets_408_within_the_silence_bound(api: str) -> None:
    """A head and 1 byte of a declared 60,000-byte body, then silence: 408 and closed ~1 s later."""
    with _connect(api) as sock:
        sock.sendall(HEAD % BODY + b"{")
        started = time.monotonic()
        reply, elapsed = _until_closed(sock, started)
    _assert_timed_out(reply)
    assert SILENCE * 0.9 <= elapsed < SILENCE + SLACK, elapsed


@pytest.mark.parametrize("part", ["body", "head"])
def test_a_trickled_request_gets_408_at_the_request_bound(api: str, part: str) -> None:
    """One byte every 0.5 s (never silent for 1 s), of the body or of the head: 408 and closed
    once the whole request has taken 3 s, not after the 60,000 bytes."""
    start, drip = (HEAD % BODY, b"x" * BODY) if part == "body" else (b"POST", (HEAD % BODY)[4:])
    with _connect(api) as sock:
        sock.sendall(start)
        started = time.monotonic()
        reply, elapsed = _until_closed(sock, started, drip)
    _assert_timed_out(reply)
    assert TOTAL * 0.9 <= elapsed < TOTAL + SLACK, elapsed


def test_an_idle_connection_is_closed_at_the_request_bound(api: str) -> None:
    """A connection that sends nothing at all is answered 408 and closed after 3 s (the first
    request's clock starts at the accept)."""
    with _connect(api) as sock:
        started = time.monotonic()
        reply, elapsed = _until_closed(sock, started)
    _assert_timed_out(reply)
    assert TOTAL * 0.9 <= elapsed < TOTAL + SLACK, elapsed


def test_a_body_after_an_early_answer_is_not_answered_twice(api: str) -> None:
    """A token read with a declared body is answered 200 without reading it; dripping that body
    on gets the connection closed at the request bound, with no second (408) answer."""
    head = HEAD.replace(b"POST /v1/tokens/svc/invalidate", b"GET /v1/tokens/svc")
    with _connect(api) as sock:
        sock.sendall(head % BODY)
        started = time.monotonic()
        reply, elapsed = _until_closed(sock, started, b"x" * BODY)
    assert [status for status, _ in _answers(reply)] == [200]
    assert TOTAL * 0.9 <= elapsed < TOTAL + SLACK, elapsed


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, object]]:
    """Read one Content-Length framed response from ``sock``."""
    reply = b""
    while True:
        head, found, rest = reply.partition(b"\r\n\r\n")
        if found:
            size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) >= size:
                [answer] = _answers(reply)
                return answer
        chunk = sock.recv(65_536)
        assert chunk, reply
        reply += chunk


def test_requests_within_the_bounds_are_served(api: str, idp: AuthorizationServer) -> None:
    """A POST with a body works: sent at once, or in two parts 0.5 s apart, and on a connection
    left idle longer than the silence bound between requests."""
    token = httpx.get(
        api + "/v1/tokens/svc", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ).json()["access_token"]
    body = json.dumps({"access_token": "not-the-current-one"}).encode()
    before = idp.count("client_credentials")
    with _connect(api) as sock:
        for pause in (0.0, 0.5, 0.5):
            sock.sendall(HEAD % len(body) + body[:5])
            time.sleep(pause)  # under the silence bound, by design
            sock.sendall(body[5:])
            status, answer = _read_answer(sock)
            assert status == 200, answer
            assert answer["access_token"] == token
            time.sleep(SILENCE * 1.5)  # idle between requests: no body is being waited for
    assert idp.count("client_credentials") == before  # the current token was kept


def test_a_slow_answer_is_not_a_slow_request(api: str, idp: AuthorizationServer) -> None:
    """The clocks stop once the request has arrived: an invalidation whose token request takes
    4 s (longer than the 3 s request bound) is answered 200."""
    token = httpx.get(
        api + "/v1/tokens/svc", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ).json()["access_token"]
    idp.inject(Fault(delay=TOTAL + 1))
    before = idp.count("client_credentials")
    answer = httpx.post(
        api + "/v1/tokens/svc/invalidate",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"access_token": token},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["access_token"] != token
    assert idp.count("client_credentials") == before + 1
