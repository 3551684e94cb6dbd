"""Request heads are bounded while they are read: the API (uvicorn), the proxy and its health port."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from support import Served, answers, client_credentials, login, wait_for
from tokenbroker import Broker
from tokenbroker.api.app import create_app
from tokenbroker.config import ProxySettings
from tokenbroker.testing import AuthorizationServer, RecordingUpstream, ServedProxy

TOTAL = 20 * 1024 * 1024
PIECE = b"a" * 65_536
LINES = (b"X-Filler: " + b"b" * 54 + b"\r\n") * 1024
# The head limit is 16 KiB; a server that bounds heads reads at most about one more
# socket buffer, never the 20 MB the client tries to send.
MAX_READ = 1024 * 1024
MAX_PEAK_GROWTH = 12 * 1024 * 1024


class Serving:
    """A ``tokenbroker serve`` process with the API, the proxy and its health port."""

    def __init__(self, process: subprocess.Popen[str], api: str, proxy: str, health: str) -> None:
        self.process = process
        self.api = api
        self.proxy = proxy
        self.health = health

    def bytes_read(self) -> int:
        """Bytes the server process has read with system calls (sockets included)."""
        text = Path(f"/proc/{self.process.pid}/io").read_text()
        return int(next(line for line in text.splitlines() if line.startswith("rchar:")).split()[1])

    def peak_rss(self) -> int:
        """The server process's peak resident memory in bytes."""
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in text.splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024


@pytest.fixture
def serving(tmp_path: Path, auth_server: AuthorizationServer) -> Iterator[Serving]:
    with RecordingUpstream(auth_server) as upstream:
        path = tmp_path / "tokenbroker.yaml"
        config = {
            "store": "memory",
            "providers": {"db": login(auth_server), "svc": client_credentials(auth_server)},
            "proxy": {
                "listen": "127.0.0.1:0",
                "health_listen": "127.0.0.1:0",
                "routes": [{"prefix": "/", "upstream": upstream.url, "provider": "db"}],
            },
        }
        path.write_text(yaml.safe_dump(config))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            api_port = probe.getsockname()[1]
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(path)]
            + ["--listen", f"127.0.0.1:{api_port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert process.stdout is not None
            proxy = process.stdout.readline().split()[-1]  # proxy listening on ...
            health = process.stdout.readline().split()[-1]
            api = f"http://127.0.0.1:{api_port}"
            wait_for(lambda: answers(api + "/healthz"), timeout=20)
            yield Serving(process, api, proxy, health)
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=20)
        assert process.returncode == 0, err


def _stream_endless_head(url: str, start: bytes) -> tuple[bytes, int]:
    """Send ``start`` and then head bytes that never end the head, until the server answers
    or drops the connection (or 20 MB went out); return its reply and the bytes sent.

    After a partial header line (``start`` not ending in CRLF) the bytes extend that line,
    else they are complete short header lines."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    piece = LINES if start.endswith(b"\r\n") else PIECE
    sent = 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65_536)
        sock.settimeout(10)
        sock.connect((host, int(port)))
        try:
            sock.sendall(start)
            while sent < TOTAL and not select.select([sock], [], [], 0)[0]:
                sent += sock.send(piece)
        except OSError:  # reset: the server closed with our bytes unread
            pass
        sock.settimeout(2)
        reply = b""
        try:
            while chunk := sock.recv(65_536):
                reply += chunk
        except OSError:  # reset, or the server never answered
            pass
    return reply, sent


def _assert_refused(reply: bytes, start: bytes) -> None:
    if b"\r\n\r\n" in start:  # a whole request first: answered, then the endless head refused
        first, *rest = reply.split(b"HTTP/1.1 ")[1:]
        assert first.startswith(b"200 "), reply[:80]
        if not rest:  # refused while the first answer was being sent: closed after it
            return
        reply = b"HTTP/1.1 " + rest[0]
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
    assert b"headers_too_large" in reply


def _check_bounded(
    serving: Serving, url: str, start: bytes, path: str = "/healthz", max_read: int = MAX_READ
) -> None:
    start = start.replace(b"/healthz", path.encode())
    read_before, peak_before = serving.bytes_read(), serving.peak_rss()
    reply, sent = _stream_endless_head(url, start)
    read = serving.bytes_read() - read_before
    _assert_refused(reply, start)
    assert read < max_read, read
    assert sent < TOTAL
    assert serving.peak_rss() - peak_before < MAX_PEAK_GROWTH
    assert answers(url + path)  # the server still serves


STARTS = {
    "value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ",  # one endless header value
    "lines": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # endless header lines
    "target": b"GET /healthz?q=",  # an endless request target
    # after a whole request, in the same read: answered, then (or instead) closed
    "pipelined": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nX-Big: ",
}


@pytest.mark.parametrize("name", sorted(STARTS))
def test_api_head_is_bounded_while_reading(serving: Serving, name: str) -> None:
    """`serve`'s API answers 431 once a head passes 16 KiB and reads ~one buffer more, not 20 MB."""
    _check_bounded(serving, serving.api, STARTS[name])


@pytest.mark.parametrize("name", sorted(STARTS))
def test_health_port_head_is_bounded_while_reading(serving: Serving, name: str) -> None:
    """The proxy's health port answers 431 once a head passes 16 KiB, reading ~one buffer more."""
    _check_bounded(serving, serving.health, STARTS[name])


@pytest.mark.parametrize("name", sorted(STARTS))
def test_proxy_head_is_bounded_while_reading(serving: Serving, name: str) -> None:
    """The proxy's own port answers 431 once a head passes its 64 KiB limit, reading about one
    buffer more: an endless header value is not buffered by the parser either."""
    # Behind a request still being answered, the proxy reads on and drops what comes (that is
    # how it sees a hang-up) until that answer is out: bounded memory, not bounded reads.
    max_read = 2 * TOTAL if name == "pipelined" else MAX_READ
    _check_bounded(serving, serving.proxy, STARTS[name], "/api/echo", max_read)


def test_proxy_trailer_fields_are_bounded_while_reading(serving: Serving) -> None:
    """An endless trailer field after a chunked body (which the parser holds until it ends) is
    refused like an endless head: 431, about one buffer read, memory flat."""
    start = (
        b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: "
    )
    read_before, peak_before = serving.bytes_read(), serving.peak_rss()
    reply, sent = _stream_endless_head(serving.proxy, start)
    read = serving.bytes_read() - read_before
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
    assert read < MAX_READ, read
    assert sent < TOTAL
    assert serving.peak_rss() - peak_before < MAX_PEAK_GROWTH
    assert answers(serving.proxy + "/api/echo")


@pytest.mark.parametrize("name", sorted(STARTS))
def test_heads_are_refused_in_process_too(
    make_broker: Callable[..., Broker], auth_server: AuthorizationServer, name: str
) -> None:
    """Served in this process (serve's uvicorn protocol; the proxy's health port), an endless
    head gets 431 and the connection ends long before 20 MB are sent."""
    broker = make_broker({"svc": client_credentials(auth_server)})
    route = {"prefix": "/", "upstream": "http://127.0.0.1:9", "provider": "svc", "mode": "shared"}
    settings = ProxySettings.model_validate({"listen": "127.0.0.1:0", "routes": [route]})
    with Served(create_app(broker)) as api, ServedProxy(broker, settings, warm=False) as proxy:
        for url in (str(api.base_url).rstrip("/"), proxy.health_url):
            reply, sent = _stream_endless_head(url, STARTS[name])
            _assert_refused(reply, STARTS[name])
            assert sent < TOTAL // 4
            assert answers(url + "/healthz")
