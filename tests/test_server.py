"""`tokenbroker serve` start-up: required providers are fetched at once, and readiness follows
only their configured scopes; a real `serve` process against the real authorization server."""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support import (
    Lines,
    client_credentials,
    free_port,
    http_status,
    login,
    serve_process,
    terminate,
    wait_for,
)
from tokenbroker.edge.descriptors import budget
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.testing import AuthorizationServer, Fault, RecordingUpstream

KEY = new_key()


@contextmanager
def serving(tmp_path: Path, providers: dict[str, Any], **server: Any) -> Iterator[httpx.Client]:
    """Run `tokenbroker serve` on a free port (more ``server:`` settings from ``server``); yield
    a client for it; SIGTERM it afterwards."""
    port = free_port()
    path = tmp_path / "tokenbroker.yaml"
    config = {
        "store": "memory",
        "defaults": {"retries": 0},
        "providers": providers,
        "consumers": {"app": {"api_key_sha256": hash_key(KEY), "allow": ["svc"]}},
        "server": {"listen": f"127.0.0.1:{port}", **server},
        "telemetry": {"log_level": "warning"},
    }
    with (
        serve_process(path, config) as served,
        httpx.Client(base_url=served.url, timeout=10) as client,
    ):
        yield client


def test_required_provider_is_fetched_at_start(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """With a required provider, /readyz turns 200 without any consumer asking, after exactly
    one token request."""
    providers = {"svc": client_credentials(auth_server, required=True)}
    with serving(tmp_path, providers) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, "ready", timeout=30)
        assert client.get("/readyz").json()["providers"] == {"svc": "valid"}
    assert auth_server.count("client_credentials") == 1


def test_a_refused_scope_does_not_make_the_broker_unready(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """A consumer allowed any scope asks for one the server refuses (invalid_scope): that
    consumer gets an error, /readyz and /health stay as they were."""
    providers = {"svc": client_credentials(auth_server, required=True)}
    with serving(tmp_path, providers) as client:
        # Readiness first through the configured scope (this works with or without start-up
        # fetching), then the refused one.
        assert client.get("/v1/tokens/svc", headers={"Authorization": f"Bearer {KEY}"}).is_success
        wait_for(lambda: client.get("/readyz").status_code == 200, "ready", timeout=30)
        refused = client.get(
            "/v1/tokens/svc", params={"scope": "admin"}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert refused.status_code == 500
        assert refused.json()["error"]["code"] == "provider_misconfigured"
        assert client.get("/readyz").status_code == 200
        health = client.get("/health").json()
        assert health["status"] == "ok"
        assert health["providers"] == {"svc": "valid"}
    assert any(r.form.get("scope") == "admin" for r in auth_server.requests)


def test_proxy_fetches_required_providers_at_start(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """`tokenbroker proxy` fetches a required provider nobody asked for, after one token request;
    its /readyz waits for that token as well as for the pool."""
    auth_server.inject(Fault(delay=2.0))  # the token request, still under way once listening
    path = tmp_path / "tokenbroker.yaml"
    config = {
        "store": "memory",
        "providers": {
            "db": login(auth_server),
            "svc": client_credentials(auth_server, required=True),
        },
        "proxy": {
            "listen": "127.0.0.1:0",
            "health_listen": "127.0.0.1:0",
            "login_concurrency": 2,
            "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9", "provider": "db"}],
        },
        "telemetry": {"log_level": "warning"},
    }
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "proxy", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()
        health_url = process.stdout.readline().split()[-1]
        assert http_status(health_url + "/readyz") == 503  # the pool is in, the token is not yet
        wait_for(lambda: http_status(health_url + "/readyz") == 200)
    finally:
        err = terminate(process)
    assert process.returncode == 0, err
    assert auth_server.count("client_credentials") == 1
    assert auth_server.count("login") == 2


def test_serve_announces_the_address_it_listens_on(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """`serve --listen 127.0.0.1:0` prints `API listening on http://127.0.0.1:PORT` with the real
    port, and that URL answers."""
    path = tmp_path / "tokenbroker.yaml"
    config = {"store": "memory", "providers": {"svc": client_credentials(auth_server)}}
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(path)]
        + ["--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = Lines(process.stdout).until("listening", timeout=30)
        assert line.startswith("API listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1]
        assert not url.endswith(":0")
        assert http_status(url + "/livez") == 200
    finally:
        terminate(process)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_gracefully_on_either_signal(
    tmp_path: Path, auth_server: AuthorizationServer, signum: signal.Signals
) -> None:
    """SIGINT (Ctrl-C) and SIGTERM both end a listening `serve` with status 0 and no
    traceback."""
    path = tmp_path / "tokenbroker.yaml"
    config = {"store": "memory", "providers": {"svc": client_credentials(auth_server)}}
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(path)]
        + ["--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = Lines(process.stdout).until("listening", timeout=30).rsplit(" ", 1)[1]
        assert http_status(url + "/livez") == 200
        process.send_signal(signum)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_serve_stops_at_once_while_the_proxy_logs_in(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """SIGTERM while `serve` still logs in the proxy's pool ends it promptly with status 0,
    before anything listens (as `tokenbroker proxy` does)."""
    accounts = [{"username": f"user{i}", "password": "pw"} for i in range(20)]
    for account in accounts:
        auth_server.add_account(account["username"], account["password"])
    auth_server.latency = 0.5  # 20 logins one at a time: 10 s unless interrupted
    path = tmp_path / "tokenbroker.yaml"
    config = {
        "store": "memory",
        "providers": {"db": login(auth_server, credentials=accounts)},
        "server": {"listen": "127.0.0.1:0"},
        "proxy": {
            "listen": "127.0.0.1:0",
            "login_concurrency": 1,
            "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9", "provider": "db"}],
        },
    }
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(path)],
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


FD_LIMIT = 256
"""The descriptor limit the `serve` process of the saturation test runs under."""


def _limit_descriptors() -> None:
    """Run in the child only (preexec_fn): lower its soft RLIMIT_NOFILE to FD_LIMIT."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


def _hold(url: str, count: int) -> tuple[list[socket.socket], dict[str, int]]:
    """Open up to ``count`` connections to ``url``, one request each, left open; the open
    sockets and how each first answer began (status, or ``none``) — stops early once three
    get no answer at all (the server has run out of descriptors)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    held: list[socket.socket] = []
    seen: dict[str, int] = {}
    for _ in range(count):
        if seen.get("none", 0) >= 3:
            break
        sock = socket.create_connection((host, int(port)), timeout=2)
        held.append(sock)
        try:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
        except OSError:
            first = b""
        status = first.split(b" ", 2)[1].decode() if first.startswith(b"HTTP/1.1 ") else "none"
        seen[status] = seen.get(status, 0) + 1
    return held, seen


def test_api_and_probes_answer_while_the_proxy_holds_more_idle_clients_than_descriptors(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """Under `ulimit -n 256`, 320 idle kept-alive proxy clients (one request each) do not take
    the process's last descriptors: the proxy caps its clients (503 beyond), and the API's
    /health, a token read and the proxy's health port answer in under 2 s."""
    with RecordingUpstream(auth_server) as upstream:
        port = free_port()
        path = tmp_path / "tokenbroker.yaml"
        config = {
            "store": "memory",
            "providers": {"svc": client_credentials(auth_server)},
            "consumers": {"app": {"api_key_sha256": hash_key(KEY), "allow": ["svc"]}},
            "server": {"listen": f"127.0.0.1:{port}"},
            "proxy": {
                "listen": "127.0.0.1:0",
                "health_listen": "127.0.0.1:0",
                "routes": [
                    {"prefix": "/", "upstream": upstream.url + "/api/", "provider": "svc"}
                    | {"mode": "shared"}
                ],
            },
            "telemetry": {"log_level": "error"},
        }
        path.write_text(yaml.safe_dump(config))
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_limit_descriptors,  # noqa: PLW1509 - only setrlimit, before exec
        )
        held: list[socket.socket] = []
        try:
            lines = Lines(process.stdout)
            proxy = lines.until("proxy listening", timeout=30).split()[-1]
            health = lines.until("health listening", timeout=30).split()[-1]
            api = f"http://127.0.0.1:{port}"
            wait_for(lambda: http_status(api + "/livez") == 200, timeout=30)
            held, seen = _hold(proxy, 320)
            timings = {}
            with httpx.Client(timeout=5) as client:
                for name, url, headers in [
                    ("api health", api + "/health", {}),
                    ("token", api + "/v1/tokens/svc", {"Authorization": f"Bearer {KEY}"}),
                    ("proxy health", health + "/health", {}),
                ]:
                    started = time.monotonic()
                    reply = client.get(url, headers=headers)
                    timings[name] = (reply.status_code, time.monotonic() - started)
        finally:
            for sock in held:
                sock.close()
            err = terminate(process)
    assert process.returncode == 0, err
    assert seen.get("200", 0) + seen.get("503", 0) == 320, seen
    assert seen.get("200") == budget(with_proxy=True, limit=FD_LIMIT).proxy_clients, seen
    assert all(status == 200 and took < 2 for status, took in timings.values()), timings


def test_api_connections_beyond_max_connections_get_503(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """With server.max_connections connections open on the API, a request on one more gets 503
    (uvicorn's limit_concurrency); once they close, the API answers again."""
    providers = {"svc": client_credentials(auth_server)}
    with serving(tmp_path, providers, max_connections=4) as client:
        host, port = str(client.base_url).removeprefix("http://").rstrip("/").rsplit(":", 1)
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        try:
            with httpx.Client(base_url=client.base_url, timeout=10) as other:
                crowded = other.get("/livez").status_code
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: client.get("/livez").status_code == 200, "the API to answer again")
    assert crowded == 503
