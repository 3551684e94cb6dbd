"""Shared pieces of the benchmarks: the local authorization server, broker settings, tables.

Every benchmark talks to a real :class:`tokenbroker.testing.AuthorizationServer` on
127.0.0.1 with one ``client_credentials`` client, so tokenbroker and the libraries it is
compared with fetch the same tokens from the same endpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tokenbroker import Settings, parse_settings
from tokenbroker.core.crypto import generate_key
from tokenbroker.testing import AuthorizationServer

CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-secret"
SCOPE = "read"
PROVIDER = "demo"
TOKEN_LIFETIME = 3600


@contextmanager
def authorization_server(*, latency: float = 0.0) -> Iterator[AuthorizationServer]:
    """Run a local authorization server with the benchmark client registered.

    Args:
        latency: Seconds the server sleeps before answering every request.

    Yields:
        The running server; it is stopped (and its connections closed) on exit.
    """
    server = AuthorizationServer(expires_in=TOKEN_LIFETIME)
    server.add_client(CLIENT_ID, CLIENT_SECRET, auth_method="client_secret_basic", scopes=[SCOPE])
    server.latency = latency
    with server:
        yield server


def authlib_oauth2_client() -> type[Any]:
    """authlib's sync ``httpx`` ``OAuth2Client`` class.

    authlib 1.9 warns on import that it runs on ``httpx`` rather than ``httpx2``; that
    notice says nothing about the benchmark, so it is silenced here (and only here).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The httpx module is deprecated")
        from authlib.integrations.httpx_client import OAuth2Client
    return OAuth2Client  # type: ignore[no-any-return]


def broker_settings(
    server: AuthorizationServer,
    *,
    timeout: float = 10.0,
    store: str = "memory",
    redis: str | None = None,
) -> Settings:
    """Settings with one ``client_credentials`` provider, :data:`PROVIDER`, on ``server``.

    Args:
        server: The running server.
        timeout: Per-request timeout of token requests, in seconds.
        store: The ``store`` URL (a persistent one gets a fresh encryption key).
        redis: The ``redis`` URL, or None for no Redis.

    Returns:
        Validated settings (no retries, so a request count is a fetch count).
    """
    text = f"""
store: {json.dumps(store)}
redis: {json.dumps(redis)}
encryption_keys: [{json.dumps(generate_key())}]
providers:
  {PROVIDER}:
    grant: client_credentials
    token_url: {server.token_url}
    client_id: {CLIENT_ID}
    client_secret: {CLIENT_SECRET}
    scopes: [{SCOPE}]
defaults:
  retries: 0
  timeout_seconds: {timeout}
"""
    return parse_settings(text, {})


@contextmanager
def redis_server() -> Iterator[str]:
    """Run a ``redis-server`` of our own on a free port of 127.0.0.1, without persistence.

    Yields:
        Its ``redis://`` URL, once it answers ``PING``; it is stopped by its PID on exit.

    Raises:
        SystemExit: ``redis-server`` is not installed or did not answer within 10 s.
    """
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        ["redis-server", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers_ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start on port {port}")
            time.sleep(0.01)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Format rows as a plain-text table: first column left-aligned, the others right.

    Args:
        header: Column titles.
        rows: Cells, already formatted as strings.

    Returns:
        The table, lines joined by newlines (no trailing newline).
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def times(ratio: float) -> str:
    """A ratio as ``1.7x`` (one decimal below 10, none from 10 up)."""
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def compared(ratio: float, other: str) -> str:
    """``9x faster than other``, ``1.3x slower than other`` or ``on par with other``.

    Args:
        ratio: The other's cost divided by ours (above 1: we are faster).
        other: The other's name.

    Returns:
        The phrase.
    """
    if ratio >= 1.1:
        return f"{times(ratio)} faster than {other}"
    if ratio <= 1 / 1.1:
        return f"{times(1 / ratio)} slower than {other}"
    return f"on par with {other} ({times(ratio)})"


def can_pin(*cores: int) -> bool:
    """Whether ``taskset`` is there and this process may use all of ``cores``."""
    return shutil.which("taskset") is not None and set(cores) <= os.sched_getaffinity(0)


def pinned(core: int, pin: bool) -> list[str]:
    """The ``taskset`` prefix that pins a command to ``core`` (empty when not ``pin``)."""
    return ["taskset", "-c", str(core)] if pin else []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
