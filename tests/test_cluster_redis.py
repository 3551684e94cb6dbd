"""Cluster mode against real redis-server instances: coalescing across brokers, degraded (not
down) while Redis is paused, no double refresh after Redis restarts empty, shared failed-key
limits, and consumer changes fanned out in milliseconds."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from redis_server import RedisServer, require_redis
from support import Served, client_credentials, stampede, wait_for
from tokenbroker import Broker, parse_settings
from tokenbroker.api.app import create_app
from tokenbroker.core.crypto import generate_key
from tokenbroker.engine.consumers import ConsumerRegistry, hash_key, new_key
from tokenbroker.testing import AuthorizationServer, Fault

KEY = generate_key()
CALLERS = 8


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """Our own redis-server on a free port; skipped (failed in CI) when it cannot run."""
    require_redis()
    server = RedisServer()
    server.start()
    yield server
    server.close()


def cluster_config(
    tmp_path: Path, auth_server: AuthorizationServer, redis: RedisServer, **extra: Any
) -> dict[str, Any]:
    """A config for brokers sharing one SQLite file and one Redis."""
    return {
        "store": f"sqlite:///{tmp_path / 'tb.db'}",
        "redis": redis.url,
        "encryption_keys": [KEY],
        "defaults": {"retries": 0},
        "providers": {"svc": client_credentials(auth_server)},
        **extra,
    }


@pytest.fixture
def brokers(
    tmp_path: Path, auth_server: AuthorizationServer, redis_server: RedisServer
) -> Iterator[Callable[..., Broker]]:
    """``brokers(**config)``: brokers on one SQLite file and one Redis, each with its own cache
    and its own Redis connections (as separate processes have); closed at the end."""
    made: list[Broker] = []

    def make(wait: float = 0.5, **extra: Any) -> Broker:
        config = cluster_config(tmp_path, auth_server, redis_server, **extra)
        broker = Broker(parse_settings(yaml.safe_dump(config), {}), coordination_wait=wait)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


def listening(*brokers: Broker) -> None:
    """Wait until every broker's Redis subscriber is subscribed."""
    wait_for(lambda: all(b.coordinator.listening for b in brokers), "redis subscriptions")  # type: ignore[union-attr]


def test_two_brokers_coalesce_and_waiters_are_woken_by_pubsub(
    brokers: Callable[..., Broker], auth_server: AuthorizationServer
) -> None:
    """N callers on each of two brokers for a cold key cause exactly one token request, and
    the other broker's callers are woken by the pub/sub notice, long before their 10 s poll."""
    first, second = brokers(wait=10.0), brokers(wait=10.0)
    listening(first, second)
    auth_server.inject(Fault(delay=0.3))  # the holder's request takes a while
    results: dict[str, list[object]] = {}
    leader = threading.Thread(
        target=lambda: results.setdefault(
            "first", stampede(CALLERS, lambda: first.get_token("svc"))
        )
    )
    leader.start()
    wait_for(lambda: auth_server.count("client_credentials") == 1, "the first broker's request")
    started = time.monotonic()
    results["second"] = stampede(CALLERS, lambda: second.get_token("svc"))
    waited = time.monotonic() - started
    leader.join(10)
    assert auth_server.count("client_credentials") == 1
    tokens = {t.access_token for t in results["first"] + results["second"]}  # type: ignore[attr-defined]
    assert len(tokens) == 1
    assert waited < 2.0, f"the second broker's callers waited {waited:.2f} s"


def test_paused_redis_degrades_then_recovers_by_itself(
    brokers: Callable[..., Broker],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Redis SIGSTOP'd, token reads (through the Redis-backed rate limit) answer within
    1 s, /health says degraded naming redis, tokenbroker_degraded{component="redis"} is 1 and
    ONE warning is logged; after SIGCONT all of it clears without a restart."""
    broker = brokers(server={"rate_limit": "1000/second"})
    key = new_key()
    registry = ConsumerRegistry([("app", hash_key(key), [])])
    from tokenbroker.core.rules import parse_rule

    registry.add("app", hash_key(key), [parse_rule("svc")])
    headers = {"Authorization": f"Bearer {key}"}
    with Served(create_app(broker, registry)) as client:
        assert client.get("/v1/tokens/svc", headers=headers).status_code == 200
        assert client.get("/health").json()["status"] == "ok"
        assert 'tokenbroker_degraded{component="redis"} 0.0' in client.get("/metrics").text
        caplog.set_level(logging.WARNING, logger="tokenbroker.cluster")
        redis_server.pause()
        try:
            slowest = 0.0
            for _ in range(10):
                started = time.monotonic()
                assert client.get("/v1/tokens/svc", headers=headers).status_code == 200
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < 1.0, f"a token read took {slowest:.2f} s"
            wait_for(lambda: client.get("/health").json()["status"] == "degraded", "degraded")
            health = client.get("/health").json()
            assert health["degraded"]["redis"].startswith("redis unreachable")
            assert redis_server.url not in str(health)
            assert 'tokenbroker_degraded{component="redis"} 1.0' in client.get("/metrics").text
            for _ in range(20):
                client.get("/v1/tokens/svc", headers=headers)
            opened = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(opened) == 1, [r.getMessage() for r in opened]
        finally:
            redis_server.resume()
        wait_for(lambda: client.get("/health").json()["status"] == "ok", "recovery", timeout=10)
        assert client.get("/health").json()["degraded"] is None
        assert 'tokenbroker_degraded{component="redis"} 0.0' in client.get("/metrics").text


def test_redis_restarted_empty_causes_no_double_refresh(
    brokers: Callable[..., Broker], auth_server: AuthorizationServer, redis_server: RedisServer
) -> None:
    """Redis restarted empty (every subscription and key gone) changes nothing about who
    refreshes: the store's lease decides, so two brokers' callers still cause one request."""
    first, second = brokers(), brokers()
    listening(first, second)
    redis_server.restart_empty()
    auth_server.inject(Fault(delay=0.2))
    results = stampede(
        2 * CALLERS, lambda: (first if threading.get_ident() % 2 else second).get_token("svc")
    )
    assert auth_server.count("client_credentials") == 1
    assert len({t.access_token for t in results}) == 1  # type: ignore[attr-defined]
    listening(first, second)  # and the subscribers came back by themselves


def test_failed_key_limit_is_shared_by_two_brokers(brokers: Callable[..., Broker]) -> None:
    """Wrong keys from one address, alternating between two brokers' APIs, are counted
    together: the 11th (over the default 10 a minute) gets 429, not the 21st."""
    apps = [Served(create_app(brokers())), Served(create_app(brokers()))]
    clients = [served.__enter__() for served in apps]
    try:
        bad = {"Authorization": f"Bearer {new_key()}"}
        statuses = [
            clients[i % 2].get("/v1/tokens/svc", headers=bad).status_code for i in range(11)
        ]
        assert statuses[:10] == [401] * 10
        assert statuses[10] == 429
    finally:
        for served in apps:
            served.__exit__(None, None, None)


def test_consumer_removal_reaches_another_process_through_pubsub(
    tmp_path: Path, auth_server: AuthorizationServer, redis_server: RedisServer
) -> None:
    """`tokenbroker consumers remove` in another process is seen by a following registry
    within ~100 ms through the pub/sub notice, although its poll fallback is 30 s here."""
    config = cluster_config(tmp_path, auth_server, redis_server)
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    cli = [sys.executable, "-m", "tokenbroker.cli", "consumers"]
    env = {**os.environ, "TOKENBROKER_CONFIG": str(path)}
    added = subprocess.run(
        [*cli, "add", "gone", "--allow", "svc", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    key = added.stdout.strip().splitlines()[-1]
    broker = Broker(parse_settings(yaml.safe_dump(config), {}))
    registry = ConsumerRegistry.load({}, broker.store, broker.coordinator)
    assert registry.authenticate(key) is not None
    import asyncio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    follower = asyncio.run_coroutine_threadsafe(registry.follow(every=30.0), loop)
    try:
        listening(broker)
        time.sleep(0.05)  # the follower's watch is registered once its task has started
        subprocess.run(
            [*cli, "remove", "gone", "--config", str(path)],
            env=env,
            check=True,
            capture_output=True,
        )
        removed_at = time.monotonic()
        seen = wait_for(lambda: registry.authenticate(key) is None, "the removal", timeout=5)
        lag = time.monotonic() - removed_at
        assert lag < 0.3, f"the removal took {lag:.3f} s to be seen"
        assert seen < 5
    finally:
        follower.cancel()
        concurrent.futures.wait([follower], 5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        broker.close()
