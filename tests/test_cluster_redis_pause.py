"""A paused Redis never holds up a warm token read of a real `tokenbroker serve` (issue 17).

The per-consumer rate limit is counted in Redis on every request. Before, that count was a
blocking call on the server's event loop: with Redis SIGSTOP'd, the first requests each
stalled the whole loop for the 0.5 s Redis timeout (two in series before the breaker
opened), and every breaker cool-down let one request through as the probe, stalling the
loop again. Now the count is awaited off the loop for at most a 0.1 s budget, only the
background ping probes a paused Redis, and the reads below stay well under the timeout.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from redis_server import RedisServer, require_redis
from support import client_credentials, free_port, serve_process, wait_for
from tokenbroker.core.crypto import generate_key
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.testing import AuthorizationServer

READERS = 12
#: Long enough for the breaker to open and for its 2 s cool-down to pass while paused.
PAUSED_SECONDS = 3.5
#: The link's Redis timeout is 0.5 s; a read that waited for it once would exceed this.
LIMIT = 0.35


@pytest.mark.parametrize("invalidate", [False, True], ids=["reads", "reads+invalidate"])
def test_warm_reads_never_wait_on_a_paused_redis(
    tmp_path: Path, auth_server: AuthorizationServer, invalidate: bool
) -> None:
    """12 concurrent readers of a warm token through a real `serve`, for 3.5 s with Redis
    SIGSTOP'd: every read is 200 and each takes < 0.35 s (the Redis timeout is 0.5 s), no
    token request is sent, /health says degraded, and it clears after SIGCONT. With
    ``invalidate``, the token is also invalidated as the pause begins: its cross-replica
    cooldown waits out the Redis timeout, in a worker thread, not on the server's loop (one
    token request follows, for the replacement)."""
    require_redis()
    redis = RedisServer()
    redis.start()
    key = new_key()
    config = {
        "store": f"sqlite:///{tmp_path / 'tb.db'}",
        "redis": redis.url,
        "encryption_keys": [generate_key()],
        "defaults": {"retries": 0},
        "providers": {"svc": client_credentials(auth_server)},
        "consumers": {"app": {"api_key_sha256": hash_key(key), "allow": ["svc"]}},
        "server": {"listen": f"127.0.0.1:{free_port()}", "rate_limit": "100000/second"},
        "telemetry": {"log_level": "error"},
    }
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with serve_process(tmp_path / "tokenbroker.yaml", config) as served:
            with httpx.Client(base_url=served.url, timeout=10) as http:
                first = http.get("/v1/tokens/svc", headers=headers)
                assert first.status_code == 200
                wait_for(lambda: http.get("/health").json()["status"] == "ok", "healthy")
            requests = auth_server.count("client_credentials")
            latencies: list[float] = []
            statuses: list[int] = []
            lock = threading.Lock()

            def reader(until: float) -> None:
                with httpx.Client(base_url=served.url, timeout=10) as client:
                    while time.monotonic() < until:
                        started = time.monotonic()
                        status = client.get("/v1/tokens/svc", headers=headers).status_code
                        with lock:
                            latencies.append(time.monotonic() - started)
                            statuses.append(status)

            redis.pause()
            try:
                until = time.monotonic() + PAUSED_SECONDS
                threads = [threading.Thread(target=reader, args=(until,)) for _ in range(READERS)]
                for thread in threads:
                    thread.start()
                if invalidate:
                    with httpx.Client(base_url=served.url, timeout=10) as http:
                        body = {"access_token": first.json()["access_token"]}
                        dropped = http.post("/v1/tokens/svc/invalidate", headers=headers, json=body)
                        assert dropped.status_code == 200, dropped.text
                for thread in threads:
                    thread.join(30)
                with httpx.Client(base_url=served.url, timeout=10) as http:
                    assert http.get("/health").json()["status"] == "degraded"
            finally:
                redis.resume()
            assert set(statuses) == {200}
            slowest = max(latencies)
            assert slowest < LIMIT, (
                f"slowest of {len(latencies)} reads took {slowest:.3f} s with Redis paused"
            )
            assert auth_server.count("client_credentials") == requests + invalidate
            with httpx.Client(base_url=served.url, timeout=10) as http:
                wait_for(lambda: http.get("/health").json()["status"] == "ok", "recovery")
    finally:
        redis.close()
