"""A PostgreSQL restart under a real `tokenbroker serve`: reads that need the store answer
`503 store_unavailable` with `Retry-After` while it is down (cached tokens keep being
served), and the same broker recovers by itself once it is back, with nothing lost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from support import client_credentials, free_port, serve_process, wait_for
from tokenbroker.cli.main import main
from tokenbroker.core.crypto import generate_key
from tokenbroker.testing import AuthorizationServer

KEY = generate_key()


def test_postgres_restart_gives_503_then_recovers_without_restarting_serve(
    tmp_path: Path, pg_url: str, postgres_server: Any, auth_server: AuthorizationServer
) -> None:
    """Down: the cached token is still served (200), invalidating it and every read after
    that are 503 `store_unavailable` with Retry-After within 5 s and no token request is sent; up again:
    the same `serve` answers 200 with a fresh token, the consumer stored before the outage
    still authenticates, and the provider saw exactly one request per token served."""
    pytest.importorskip("psycopg")
    store = f"{pg_url}{'&' if '?' in pg_url else '?'}timeout=2"
    config = {
        "store": store,
        "encryption_keys": [KEY],
        "defaults": {"retries": 0},
        "providers": {"svc": client_credentials(auth_server)},
        "server": {"listen": f"127.0.0.1:{free_port()}"},
        "telemetry": {"log_level": "warning"},
    }
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    added = CliRunner().invoke(
        main, ["consumers", "add", "app", "--allow", "svc", "--config", str(path)]
    )
    assert added.exit_code == 0, added.output
    headers = {"Authorization": f"Bearer {added.output.strip().splitlines()[-1]}"}
    try:
        with serve_process(path, config) as served, httpx.Client(base_url=served.url) as http:
            first = http.get("/v1/tokens/svc", headers=headers)
            assert first.status_code == 200, first.text
            old = first.json()["access_token"]
            postgres_server.stop()
            assert http.get("/v1/tokens/svc", headers=headers).json()["access_token"] == old
            dropped = http.post(
                "/v1/tokens/svc/invalidate", headers=headers, json={"access_token": old}
            )
            # The token is dropped; the refresh that follows needs the store: 503.
            assert dropped.status_code == 503, dropped.text
            started = time.monotonic()
            down = http.get("/v1/tokens/svc", headers=headers, timeout=30)
            assert time.monotonic() - started < 5.0
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "store_unavailable"
            assert int(down.headers["Retry-After"]) >= 1
            assert auth_server.count("client_credentials") == 1
            postgres_server.start()

            def recovered() -> bool:
                return http.get("/v1/tokens/svc", headers=headers, timeout=30).status_code == 200

            wait_for(recovered, "serve to recover after PostgreSQL restarted", timeout=30)
            new = http.get("/v1/tokens/svc", headers=headers).json()["access_token"]
            assert new != old
            assert auth_server.count("client_credentials") == 2
            assert KEY not in http.get("/health").text
    finally:
        if postgres_server.pid is None:
            postgres_server.start()
    assert KEY not in served.stderr
