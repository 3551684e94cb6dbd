"""`tokenbroker serve` start-up: required providers are fetched at once, and readiness follows
only their configured scopes; a real `serve` process against the real authorization server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from support import Lines, client_credentials, free_port, http_status, login, terminate, wait_for
from tokenbroker.consumers import hash_key, new_key
from tokenbroker.testing import AuthorizationServer, Fault

KEY = new_key()


@contextmanager
def serving(tmp_path: Path, providers: dict[str, Any]) -> Iterator[httpx.Client]:
    """Run `tokenbroker serve` on a free port; yield a client for it; SIGTERM it afterwards."""
    port = free_port()
    path = tmp_path / "tokenbroker.yaml"
    config = {
        "store": "memory",
        "defaults": {"retries": 0},
        "providers": providers,
        "consumers": {"app": {"api_key_sha256": hash_key(KEY), "allow": ["svc"]}},
        "server": {"listen": f"127.0.0.1:{port}"},
        "telemetry": {"log_level": "warning"},
    }
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_status(url + "/livez") == 200)
        with httpx.Client(base_url=url, timeout=10) as client:
            yield client
    finally:
        err = terminate(process)
    assert process.returncode == 0, err


def test_required_provider_is_fetched_at_start(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """With a required provider, /readyz turns 200 without any consumer asking, after exactly
    one token request."""
    providers = {"svc": client_credentials(auth_server, required=True)}
    with serving(tmp_path, providers) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
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
        wait_for(lambda: client.get("/readyz").status_code == 200)
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
