"""The proxy's health port, metrics, CLI (proxy, pool status, serve), config checks and secrecy."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from conftest import BrokerFactory
from support import Served, answers, client_credentials, login, wait_for
from tokenbroker import Broker, ConfigError, parse_settings
from tokenbroker.cli.main import main
from tokenbroker.config import ProxySettings
from tokenbroker.proxy import compiled
from tokenbroker.proxy.http import is_unsafe_path
from tokenbroker.proxy.routes import Route
from tokenbroker.testing import AuthorizationServer, RecordingUpstream, ServedProxy


@pytest.fixture
def upstream(auth_server: AuthorizationServer) -> Iterator[RecordingUpstream]:
    """An upstream that accepts only tokens the authorization server currently accepts."""
    with RecordingUpstream(auth_server) as served:
        yield served


def _proxy_settings(upstream: RecordingUpstream, **extra: Any) -> ProxySettings:
    return ProxySettings.model_validate(
        {
            "listen": "127.0.0.1:0",
            "routes": [
                {"prefix": "/", "upstream": upstream.url, "provider": "db", "mode": "pool"},
                {
                    "prefix": "/svc/",
                    "upstream": upstream.url + "/api/",
                    "provider": "svc",
                    "mode": "shared",
                },
            ],
            **extra,
        }
    )


@pytest.fixture
def broker(auth_server: AuthorizationServer, make_broker: BrokerFactory) -> Broker:
    """Login provider ``db`` (alice, bob) and client-credentials provider ``svc``."""
    return make_broker({"db": login(auth_server), "svc": client_credentials(auth_server)})


def test_health_probes_follow_the_pool(broker: Broker, upstream: RecordingUpstream) -> None:
    """/health counts leases; /readyz is 503 while every token is held; /livez stays 200."""
    with (
        ServedProxy(broker, _proxy_settings(upstream)) as proxy,
        httpx.Client(base_url=proxy.health_url) as probe,
    ):
        health = probe.get("/health").json()
        assert health["status"] == "ok"
        assert health["pool"] == {"total": 2, "in_use": 0, "available": 2, "waiting": 0}
        assert probe.get("/readyz").status_code == 200
        holders = [httpx.Client(base_url=proxy.url) for _ in range(2)]
        try:
            for client in holders:  # one keep-alive connection each: each holds a token
                assert client.get("/api/echo").status_code == 200
            health = probe.get("/health").json()
            assert health["pool"]["in_use"] == 2
            assert health["pool"]["available"] == 0
            assert health["status"] == "degraded"
            assert probe.get("/readyz").status_code == 503
            assert probe.get("/livez").status_code == 200
            assert probe.get("/healthz").status_code == 200
            accounts = {c["account"]: c for c in health["routes"][1]["pool"]["credentials"]}
            assert set(accounts) == {"alice", "bob"}
            assert all(c["uses"] == 1 and c["state"] == "leased" for c in accounts.values())
            assert all(0 <= c["idle_seconds"] < 10 for c in accounts.values())
        finally:
            for client in holders:
                client.close()
        wait_for(lambda: probe.get("/health").json()["pool"]["available"] == 2)
        assert probe.get("/readyz").status_code == 200
        assert probe.get("/nope").status_code == 404
        assert probe.post("/health").status_code == 405


def test_metrics_expose_pool_and_responses_never_a_token(
    broker: Broker, upstream: RecordingUpstream, auth_server: AuthorizationServer
) -> None:
    """/metrics has pool gauges, the lease-wait histogram, per-account counters, statuses."""
    with ServedProxy(broker, _proxy_settings(upstream)) as proxy:
        with httpx.Client(base_url=proxy.url) as client:
            for _ in range(3):
                assert client.get("/api/echo").status_code == 200
            assert client.get("/svc/echo").status_code == 200
            assert client.get("/api/status/418").status_code == 418
        text = httpx.get(proxy.health_url + "/metrics").text
    assert 'tokenbroker_pool_tokens{route="/",state="total"} 2.0' in text
    assert 'tokenbroker_pool_waiting{route="/"} 0.0' in text
    assert 'tokenbroker_pool_lease_wait_seconds_count{provider="db"} 1.0' in text
    uses = [line for line in text.splitlines() if "pool_credential_uses_total{" in line]
    assert sorted(float(line.rsplit(" ", 1)[1]) for line in uses) == [0.0, 4.0]
    assert 'tokenbroker_pool_credential_refreshes_total{account="alice"' in text
    assert 'tokenbroker_proxy_responses_total{status="200"} 4.0' in text
    assert 'tokenbroker_proxy_responses_total{status="418"} 1.0' in text
    issued = auth_server.issued_login_tokens + auth_server.issued_access_tokens
    assert issued
    assert not any(token in text for token in issued)


def test_shared_route_maps_prefix_to_the_upstream_path(
    broker: Broker, upstream: RecordingUpstream, auth_server: AuthorizationServer
) -> None:
    """/svc/echo?x=1 reaches /api/echo?x=1 with the client-credentials token, not a pool one."""
    with ServedProxy(broker, _proxy_settings(upstream)) as proxy:
        reply = httpx.get(proxy.url + "/svc/echo?x=1", headers={"Authorization": "Basic Zm9v"})
        assert reply.status_code == 200
        assert reply.json()["path"] == "/api/echo"
        assert reply.json()["query"] == "x=1"
        assert proxy.stats().in_use == 0  # the shared route took no lease
    (record,) = upstream.records()
    assert record.token in auth_server.issued_access_tokens


def test_login_failure_at_start_is_reported_and_the_route_answers_503(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, upstream: RecordingUpstream
) -> None:
    """An account whose password is wrong is FAILED; the others still serve."""
    creds = [{"username": "alice", "password": "wrong"}, {"username": "bob", "password": "bob-pw"}]
    broker = make_broker({"db": login(auth_server, credentials=creds)}, defaults={"retries": 0})
    settings = ProxySettings.model_validate(
        {
            "listen": "127.0.0.1:0",
            "routes": [{"prefix": "/", "upstream": upstream.url, "provider": "db"}],
        }
    )
    with ServedProxy(broker, settings) as proxy:
        states = {c.account: c.state.value for c in proxy.stats().credentials}
        assert states == {"alice": "failed", "bob": "available"}
        assert httpx.get(proxy.url + "/api/echo").status_code == 200


def test_unsafe_paths() -> None:
    """Every traversal and ambiguity form is refused; ordinary paths are not."""
    for path in [
        b"/a/../b",
        b"/..",
        b"/a/./b",
        b"/%2e%2e/x",
        b"/%2E%2e/x",
        b"/a%2fb",
        b"/a%2Fb",
        b"/a%5cb",
        b"/..;x=y/a",
        b"//evil",
        b"/a#frag",
        b"/a\\b",
        b"/a%00b",
        b"/a\x00b",
        b"/.",
        b"/%252e%252e/x",
        b"/a%252Fb",
        b"/%25%32%65",
        b"/%%32%65",
        b"/a%25b",
        b"/%c0%ae%c0%ae/x",
        b"/%C0%AF",
        b"/%e0%80%ae",
        b"/%ed%a0%80",
        b"/%ff",
        b"/caf\xe9",
    ]:
        assert is_unsafe_path(path), path
    for path in [
        b"/",
        b"/api/echo",
        b"/a..b/c",
        b"/.well-known/x",
        b"/a%20b",
        b"/v1.2/x",
        b"/100%25",
        b"/a%25zz",
        b"/caf%C3%A9",
        b"/%e2%82%ac/x",
    ]:
        assert not is_unsafe_path(path), path


def test_route_targets(broker: Broker) -> None:
    """Prefixes map onto the upstream's base path, with or without trailing slashes."""

    def route(prefix: str, upstream: str) -> Route:
        spec = {"prefix": prefix, "upstream": upstream, "provider": "svc", "mode": "shared"}
        settings = ProxySettings.model_validate({"routes": [spec]})
        return Route(settings.routes[0], broker, settings)

    assert route("/", "http://h:1").target(b"/a/b") == b"/a/b"
    assert route("/db/", "http://h:1/api/").target(b"/db/x") == b"/api/x"
    assert route("/db", "http://h:1/api").target(b"/db/x") == b"/api/x"
    assert route("/db", "http://h:1/api").target(b"/db") == b"/api/"
    assert not route("/db", "http://h:1").matches(b"/dbx")
    assert route("/db", "http://h:1").matches(b"/db/y")
    assert route("/db", "http://h:1").host == b"h:1"


@pytest.mark.parametrize(
    ("proxy", "problem"),
    [
        ({"routes": []}, "proxy.routes"),
        ({"routes": [{"prefix": "/", "upstream": "http://h", "provider": "nope"}]}, "no provider"),
        ({"routes": [{"prefix": "/", "upstream": "http://h", "provider": "svc"}]}, "mode pool"),
        (
            {
                "routes": [
                    {"prefix": "/", "upstream": "http://h", "provider": "db", "mode": "shared"}
                ]
            },
            "mode pool",
        ),
        ({"routes": [{"prefix": "a", "upstream": "http://h", "provider": "db"}]}, "prefix"),
        ({"routes": [{"prefix": "/%2e/", "upstream": "http://h", "provider": "db"}]}, "prefix"),
        ({"routes": [{"prefix": "/", "upstream": "ftp://h", "provider": "db"}]}, "upstream"),
        ({"routes": [{"prefix": "/", "upstream": "http://u:p@h", "provider": "db"}]}, "upstream"),
        (
            {
                "listen": "nohost",
                "routes": [{"prefix": "/", "upstream": "http://h", "provider": "db"}],
            },
            "listen",
        ),
        (
            {"routes": [{"prefix": "/", "upstream": "http://h", "provider": "db"}] * 2},
            "same prefix",
        ),
        *(
            (
                {
                    "routes": [
                        {"prefix": "/", "upstream": "http://h", "provider": "db", "methods": m}
                    ]
                },
                "methods",
            )
            for m in (["GET", "TRACE"], ["CONNECT"], ["get"], [], ["GET", "GET"], ["G T"])
        ),
    ],
)
def test_bad_proxy_config_is_named(
    auth_server: AuthorizationServer, proxy: dict[str, Any], problem: str
) -> None:
    """Each bad proxy setting is refused with the field or reason named."""
    config = {
        "store": "memory",
        "providers": {"db": login(auth_server), "svc": client_credentials(auth_server)},
        "proxy": proxy,
    }
    with pytest.raises(ConfigError, match=problem):
        parse_settings(yaml.safe_dump(config), {})


def _config(tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream) -> Path:
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "store": "memory",
                "providers": {"db": login(auth_server)},
                "proxy": {
                    "listen": "127.0.0.1:0",
                    "health_listen": "127.0.0.1:0",
                    "routes": [{"prefix": "/", "upstream": upstream.url, "provider": "db"}],
                },
                "telemetry": {"log_level": "info"},
            }
        )
    )
    path.chmod(0o600)  # it holds the login passwords as written (check warns otherwise)
    return path


def test_check_shows_the_safe_lease_and_client_limits_a_config_leaves_out(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """With none of them set, `tokenbroker check` shows the limits the proxy applies: an
    idle pool connection gives its account back after 30 s, a waiter waits 60 s, a request
    must arrive within 120 s and a client must read within 60 s."""
    result = CliRunner().invoke(
        main, ["check", "--config", str(_config(tmp_path, auth_server, upstream))]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1:] == [
        "store memory: keeps nothing between runs; no schema to migrate",
        "proxy: client_header_timeout_seconds=10 client_body_timeout_seconds=60 "
        "client_request_timeout_seconds=120 client_send_timeout_seconds=60",
        "proxy.routes.0 (/ -> db, pool): wait_timeout_seconds=60 idle_timeout_seconds=30 "
        "max_lease_seconds=none",
    ]


def test_proxy_command_serves_and_pool_status_reads_it(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """`tokenbroker proxy` logs in, announces its ports, serves, and stops on SIGTERM;
    `tokenbroker pool status --url` prints the pool; no token reaches its output or logs."""
    path = _config(tmp_path, auth_server, upstream)
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "proxy", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        proxy_line = process.stdout.readline()
        health_line = process.stdout.readline()
        assert proxy_line.startswith("proxy listening on http://127.0.0.1:")
        assert health_line.startswith("health listening on http://127.0.0.1:")
        proxy_url, health_url = proxy_line.split()[-1], health_line.split()[-1]
        assert auth_server.count("login") == 2  # both accounts logged in before listening
        with httpx.Client(base_url=proxy_url) as client:
            assert client.get("/api/echo").status_code == 200
            status = CliRunner().invoke(main, ["pool", "status", "--url", health_url])
        assert status.exit_code == 0, status.output
        assert "1 of 2 tokens in use" in status.output
        assert " s ago" in status.output  # the account in use
        assert "never" in status.output  # the other one
        assert "alice" in status.output
        assert "bob" in status.output
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    secrets = auth_server.issued_login_tokens + ["alice-pw", "bob-pw"]
    assert not any(s in out + err + status.output for s in secrets)


def test_proxy_command_without_a_proxy_section_fails_clearly(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """Exit 2 naming the missing section."""
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(yaml.safe_dump({"store": "memory", "providers": {"db": login(auth_server)}}))
    result = CliRunner().invoke(main, ["proxy", "--config", str(path)])
    assert result.exit_code == 2
    assert "proxy: is required" in result.output


def test_pool_status_needs_a_health_port(tmp_path: Path, auth_server: AuthorizationServer) -> None:
    """Without --url and without proxy.health_listen, pool status says which field is missing."""
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(yaml.safe_dump({"store": "memory", "providers": {"db": login(auth_server)}}))
    result = CliRunner().invoke(main, ["pool", "status", "--config", str(path)])
    assert result.exit_code == 2
    assert "proxy.health_listen" in result.output
    down = CliRunner().invoke(main, ["pool", "status", "--url", "http://127.0.0.1:9"])
    assert down.exit_code == 1
    assert "cannot read" in down.output


def test_health_json_is_plain_json(broker: Broker, upstream: RecordingUpstream) -> None:
    """The health document parses and lists every route with its mode."""
    with ServedProxy(broker, _proxy_settings(upstream)) as proxy:
        body = httpx.get(proxy.health_url + "/health").content
    routes = {r["prefix"]: r["mode"] for r in json.loads(body)["routes"]}
    assert routes == {"/": "pool", "/svc/": "shared"}


BAD_REQUESTS = {
    "content-length with transfer-encoding": b"POST /api/echo HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two content-lengths": b"POST /api/echo HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    "transfer-encoding not ending in chunked": b"POST /api/echo HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: gzip\r\n\r\nGET /api/echo HTTP/1.1\r\n\r\n",
    "chunked then gzip": b"POST /api/echo HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET /api/echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "NUL in a value": b"GET /api/echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "CR in a value": b"GET /api/echo HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    "bare LF": b"GET /api/echo HTTP/1.1\nHost: x\n\n",
    "space in a name": b"GET /api/echo HTTP/1.1\r\nHost: x\r\nX A: a\r\n\r\n",
    "absolute-form target": b"GET http://evil.example/api/echo HTTP/1.1\r\nHost: x\r\n\r\n",
    "asterisk target": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_smuggling_and_bad_bytes_get_400_and_nothing_is_forwarded(
    broker: Broker, upstream: RecordingUpstream, name: str
) -> None:
    """Checklist C4: ambiguous framing and bad header bytes are refused before any forwarding."""
    with ServedProxy(broker, _proxy_settings(upstream)) as proxy:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(BAD_REQUESTS[name])
            reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    assert b"connection: close" in reply.lower()
    assert upstream.records() == []


def test_oversized_head_gets_431(broker: Broker, upstream: RecordingUpstream) -> None:
    """Checklist C2: a request head over 64 KiB is refused with 431 and not forwarded."""
    with ServedProxy(broker, _proxy_settings(upstream)) as proxy:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /api/echo HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
            reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert upstream.records() == []


def _read_all(sock: socket.socket) -> bytes:
    """Read until the proxy closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_serve_runs_the_api_and_the_proxy_and_stops_cleanly(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """`tokenbroker serve` with a proxy: section serves both; SIGTERM ends it with status 0."""
    path = _config(tmp_path, auth_server, upstream)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        api_port = probe.getsockname()[1]
    process = subprocess.Popen(  # noqa: S603
        [
            sys.executable,
            "-m",
            "tokenbroker.cli",
            "serve",
            "--config",
            str(path),
            "--listen",
            f"127.0.0.1:{api_port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        proxy_url = process.stdout.readline().split()[-1]
        process.stdout.readline()
        wait_for(lambda: answers(f"http://127.0.0.1:{api_port}/healthz"))
        assert httpx.get(proxy_url + "/api/echo").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err


def test_proxy_stops_at_once_while_logging_in(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """SIGTERM during a slow pool warm-up ends the process promptly, with status 0."""
    accounts = [{"username": f"user{i}", "password": "pw"} for i in range(20)]
    for account in accounts:
        auth_server.add_account(account["username"], account["password"])
    auth_server.latency = 0.5  # 20 logins one at a time: 10 s unless interrupted
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "store": "memory",
                "providers": {"db": login(auth_server, credentials=accounts)},
                "proxy": {
                    "listen": "127.0.0.1:0",
                    "login_concurrency": 1,
                    "routes": [{"prefix": "/", "upstream": upstream.url, "provider": "db"}],
                },
            }
        )
    )
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "proxy", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: auth_server.count("login") >= 1)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "listening" not in out
    assert elapsed < 3.0
    assert auth_server.count("login") < 20


def test_login_progress_bar_on_a_terminal(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """With stderr on a terminal, `tokenbroker proxy` shows the pool log-in as a progress
    bar that reaches 100% before it announces its ports; no password is shown."""
    path = _config(tmp_path, auth_server, upstream)
    main_fd, terminal_fd = pty.openpty()
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "proxy", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=terminal_fd,
        text=True,
    )
    os.close(terminal_fd)
    shown = b""
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("proxy listening on")
        while select.select([main_fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
        os.close(main_fd)
    assert b"logging in" in shown
    assert b"100%" in shown
    assert b"alice-pw" not in shown


def test_a_background_refresh_applies_to_the_next_request_on_the_same_connection(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, upstream: RecordingUpstream
) -> None:
    """Tokens refreshed on TTL by the proxy's ticker are used by the very next request of a
    connection that stays open; no request fails and no request waits for a login."""
    broker = make_broker({"db": login(auth_server, ttl_seconds=2)}, defaults={"skew_seconds": 0})
    settings = ProxySettings.model_validate(
        {
            "listen": "127.0.0.1:0",
            "refresh_check_seconds": 0.1,
            "routes": [{"prefix": "/", "upstream": upstream.url, "provider": "db"}],
        }
    )
    with ServedProxy(broker, settings) as proxy, httpx.Client(base_url=proxy.url) as client:
        assert client.get("/api/echo", headers={"X-Client": "one"}).status_code == 200
        logins = auth_server.count("login")
        wait_for(lambda: auth_server.count("login") > logins)  # refreshed in the background
        statuses = []
        deadline = time.monotonic() + 10
        while len({r.token for r in upstream.records()}) < 2 and time.monotonic() < deadline:
            statuses.append(client.get("/api/echo", headers={"X-Client": "one"}).status_code)
        uses = sorted(c.uses for c in proxy.stats().credentials)
    assert set(statuses) == {200}
    assert uses[0] == 0  # one connection, one account all along
    records = upstream.records()
    assert {r.client for r in records} == {"one"}
    first, last = records[0].token, records[-1].token
    assert first != last
    assert last in auth_server.issued_login_tokens


@pytest.mark.parametrize("size", [100, 1 << 20], ids=["kept-body", "streamed-body"])
def test_a_stalled_request_body_is_timed_out_and_frees_the_token(
    broker: Broker, upstream: RecordingUpstream, size: int
) -> None:
    """A client that stops sending its body gets 408 after client_body_timeout_seconds,
    and its pool token goes back to the pool (kept and streamed bodies alike)."""
    settings = _proxy_settings(upstream, client_body_timeout_seconds=0.3, refresh_check_seconds=0.1)
    with ServedProxy(broker, settings) as proxy:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                f"PUT /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
                + b"0123456789"
            )
            wait_for(lambda: proxy.stats().in_use == 1)
            started = time.monotonic()
            reply = _read_all(sock)  # until the proxy closes the connection
            waited = time.monotonic() - started
        wait_for(lambda: proxy.stats().available == proxy.stats().total)
    assert waited < 5
    assert reply.startswith(b"HTTP/1.1 408 ")  # nothing had been answered yet
    if size == 100:  # a body small enough to keep for a resend is sent only when complete
        assert upstream.records() == []


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickling"])
def test_a_slow_request_head_gets_408_and_never_holds_a_token(
    broker: Broker, upstream: RecordingUpstream, trickle: bool
) -> None:
    """A client that does not finish its request head within client_header_timeout_seconds
    (stalled, or sending a byte at a time) gets 408 and a close, and never takes a pool token;
    a kept-alive connection idle between requests is not cut off by that timeout."""
    settings = _proxy_settings(
        upstream, client_header_timeout_seconds=0.5, refresh_check_seconds=0.1
    )
    head = b"GET /api/echo HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with ServedProxy(broker, settings) as proxy:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        idle = http.client.HTTPConnection(host, int(port), timeout=10)
        idle.connect()
        idle.auto_open = 0  # a closed connection raises instead of redialling
        with contextlib.closing(idle), socket.create_connection((host, int(port)), 10) as slow:
            idle.request("GET", "/api/echo", headers={"X-Client": "idle"})
            assert idle.getresponse().read()
            started = time.monotonic()
            in_use, sent = set(), 0
            while not select.select([slow], [], [], 0.05)[0]:
                in_use.add(proxy.stats().in_use)
                assert time.monotonic() - started < 5, "the slow head was never cut off"
                if trickle or not sent:
                    slow.sendall(head[sent : sent + 1])
                    sent += 1
            waited = time.monotonic() - started
            reply = _read_all(slow)
            idle.request("GET", "/api/echo", headers={"X-Client": "idle"})
            assert idle.getresponse().status == 200
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in reply.lower()
    assert 0.4 < waited < 3
    assert in_use == {1}  # the idle connection's token only
    assert [r.client for r in upstream.records()] == ["idle", "idle"]


def test_the_build_under_test_is_the_one_expected() -> None:
    """`make test` runs these tests twice: on the editable sources, and (with
    TOKENBROKER_EXPECT_COMPILED=1) on a wheel built with mypyc, so both builds are tested."""
    expected = os.environ.get("TOKENBROKER_EXPECT_COMPILED") == "1"
    assert compiled() is expected


class _NotFound(http.server.BaseHTTPRequestHandler):
    """A plain web server: 404 with an HTML page for everything."""

    def do_GET(self) -> None:
        body = b"<html><body>Not Found</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_pool_status_refuses_a_port_that_is_not_a_proxy_health_port(
    make_broker: BrokerFactory,
) -> None:
    """pool status against the API port, a plain 404/HTML server, or a closed port prints one
    error line naming the URL and exits 1, without a traceback."""
    from tokenbroker.api.app import create_app
    from tokenbroker.engine.consumers import ConsumerRegistry

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening
        try:
            with Served(create_app(make_broker(), ConsumerRegistry([]))) as api:
                urls = [str(api.base_url).rstrip("/"), f"http://127.0.0.1:{web.server_port}"]
                results = {
                    url: CliRunner().invoke(main, ["pool", "status", "--url", url])
                    for url in [*urls, closed]
                }
        finally:
            web.shutdown()
            web.server_close()
    for url, result in results.items():
        assert result.exit_code == 1, (url, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        (line,) = result.output.splitlines()
        assert line.startswith("error: ") and f"{url}/health" in line, line
        assert "not a tokenbroker proxy health port" in line or "nothing answers" in line, line


def test_proxy_health_reports_the_worst_pool_account(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, upstream: RecordingUpstream
) -> None:
    """A pool account whose login fails (not the first one) makes the proxy's /health name
    its provider ``failed`` and say ``degraded``; pool status prints that state."""
    creds = [{"username": "alice", "password": "alice-pw"}, {"username": "bob", "password": "x"}]
    broker = make_broker({"db": login(auth_server, credentials=creds)}, defaults={"retries": 0})
    settings = ProxySettings.model_validate(
        {
            "listen": "127.0.0.1:0",
            "health_listen": "127.0.0.1:0",
            "routes": [{"prefix": "/", "upstream": upstream.url, "provider": "db"}],
        }
    )
    with ServedProxy(broker, settings) as proxy:
        health = httpx.get(proxy.health_url + "/health").json()
        assert (health["status"], health["providers"]) == ("degraded", {"db": "failed"})
        status = CliRunner().invoke(main, ["pool", "status", "--url", proxy.health_url])
    assert status.exit_code == 0, status.output
    assert "route / -> db (pool): total 2" in status.output
    assert status.output.splitlines()[1].endswith("; provider failed"), status.output


def test_an_idle_keep_alive_connection_is_closed_and_frees_its_token(
    broker: Broker, upstream: RecordingUpstream
) -> None:
    """A connection idle for client_keepalive_seconds after its answer is closed by the proxy
    and its pool token goes back; one waiting longer than that for its answer is not cut."""
    settings = _proxy_settings(upstream, client_keepalive_seconds=0.5, refresh_check_seconds=0.1)
    with ServedProxy(broker, settings) as proxy:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(b"GET /api/slow?seconds=1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
            with socket.create_connection((host, int(port)), timeout=10) as idle:
                idle.sendall(b"GET /api/echo HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _read_answer(idle).startswith(b"HTTP/1.1 200 ")
                answered = time.monotonic()
                rest = _read_all(idle)  # until the proxy closes the connection
                waited = time.monotonic() - answered
            reply = slow.recv(65536)
        wait_for(lambda: proxy.stats().in_use == 0)
    assert rest == b""
    assert 0.4 < waited < 5
    assert reply.startswith(b"HTTP/1.1 200 ")


def _read_answer(sock: socket.socket) -> bytes:
    """One whole answer framed by Content-Length (its body may come in a later read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert found is not None, head
    while len(body) < int(found.group(1)):
        body += sock.recv(65536)
    return data


def test_connections_beyond_max_client_connections_get_503_and_a_close(
    broker: Broker, upstream: RecordingUpstream
) -> None:
    """With max_client_connections held (idle, after one request each), a new connection gets
    503 and is closed at once, before it sends anything; once one closes, a new one is served."""
    settings = _proxy_settings(upstream, max_client_connections=2, refresh_check_seconds=0.1)
    with ServedProxy(broker, settings) as proxy:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(b"GET /svc/echo HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            with socket.create_connection((host, int(port)), timeout=10) as extra:
                refused = _read_all(extra)
            assert proxy.server.connections and len(proxy.server.connections) == 2
        finally:
            held.pop().close()
        wait_for(lambda: len(proxy.server.connections) == 1)
        with httpx.Client(base_url=proxy.url) as client:
            assert client.get("/svc/echo").status_code == 200
        held[0].close()
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    assert [r.path for r in upstream.records()] == ["/api/echo"] * 3
