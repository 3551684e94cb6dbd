"""Cross-replica limits and fan-out against a real redis-server: a token invalidated on one
broker leaves the other's cache within milliseconds, the invalidate cooldown is one per key
across brokers, and ``max_scopes`` counts scope sets across brokers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from redis_server import RedisServer, require_redis
from support import client_credentials, wait_for
from tokenbroker import Broker, parse_settings
from tokenbroker.core.crypto import generate_key
from tokenbroker.errors import TooManyScopesError
from tokenbroker.testing import AuthorizationServer

KEY = generate_key()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """Our own redis-server on a free port; skipped (failed in CI) when it cannot run."""
    require_redis()
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def brokers(
    tmp_path: Path, auth_server: AuthorizationServer, redis_server: RedisServer
) -> Iterator[Callable[..., Broker]]:
    """``brokers(**provider)``: brokers on one SQLite file and one Redis, each with its own
    cache and Redis connections (as replicas have); closed at the end."""
    made: list[Broker] = []

    def make(**provider: Any) -> Broker:
        config = {
            "store": f"sqlite:///{tmp_path / 'tb.db'}",
            "redis": redis_server.url,
            "encryption_keys": [KEY],
            "defaults": {"retries": 0},
            "providers": {"svc": client_credentials(auth_server, **provider)},
        }
        broker = Broker(parse_settings(yaml.safe_dump(config), {}))
        made.append(broker)
        wait_for(lambda: broker.coordinator.listening, "redis subscription")  # type: ignore[union-attr]
        return broker

    yield make
    for broker in made:
        broker.close()


def test_invalidated_token_leaves_the_other_brokers_cache_within_milliseconds(
    brokers: Callable[..., Broker], auth_server: AuthorizationServer
) -> None:
    """After broker A invalidates token T, broker B stops serving T (its cache drops it) in
    under 0.5 s without being asked, and B's next read gets A's one new token: 2 requests."""
    first, second = brokers(), brokers()
    old = first.get_token("svc").access_token
    assert second.get_token("svc").access_token == old
    assert second.peek_token("svc") is not None
    started = time.monotonic()
    assert first.invalidate("svc", old)
    wait_for(lambda: second.peek_token("svc") is None, "the fan-out", timeout=2.0)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5, f"the other broker dropped it after {elapsed:.3f} s"
    new = first.get_token("svc").access_token
    assert new != old
    assert second.get_token("svc").access_token == new
    assert auth_server.count("client_credentials") == 2


def test_invalidate_cooldown_is_one_per_key_across_brokers(
    brokers: Callable[..., Broker], auth_server: AuthorizationServer
) -> None:
    """Within the cooldown, an invalidation of the new token on *another* broker is ignored
    (the token stays, no third request): N brokers do not multiply the cooldown by N."""
    first, second = brokers(invalidate_cooldown_seconds=30), brokers(invalidate_cooldown_seconds=30)
    old = first.get_token("svc").access_token
    assert second.get_token("svc").access_token == old
    assert first.invalidate("svc", old)
    wait_for(lambda: second.peek_token("svc") is None, "the fan-out")
    new = second.get_token("svc").access_token
    assert new != old
    assert not second.invalidate("svc", new)
    assert not first.invalidate("svc", first.get_token("svc").access_token)
    assert second.get_token("svc").access_token == new
    assert auth_server.count("client_credentials") == 2


def test_max_scopes_counts_scope_sets_of_every_broker(brokers: Callable[..., Broker]) -> None:
    """With ``max_scopes: 2`` (the configured set plus one), a new scope set admitted on broker
    A fills the budget, so broker B refuses a third one it has never seen; a set already
    admitted anywhere is accepted everywhere."""
    first, second = brokers(max_scopes=2), brokers(max_scopes=2)
    first.resolve(("svc", "write", None))
    with pytest.raises(TooManyScopesError):
        second.resolve(("svc", "admin", None))
    second.resolve(("svc", "write", None))
    second.resolve(("svc", "read", None))


def test_limits_fall_back_to_this_process_while_redis_is_paused(
    brokers: Callable[..., Broker],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Redis SIGSTOP'd, invalidate and a new scope set still answer within 1.5 s using
    this process's own counts, and no token appears in any log line."""
    broker = brokers(max_scopes=2)
    token = broker.get_token("svc").access_token
    caplog.set_level(logging.DEBUG, logger="tokenbroker")
    redis_server.pause()
    try:
        started = time.monotonic()
        assert broker.invalidate("svc", token)
        broker.resolve(("svc", "write", None))
        with pytest.raises(TooManyScopesError):
            broker.resolve(("svc", "admin", None))
        assert time.monotonic() - started < 1.5
    finally:
        redis_server.resume()
    assert all(token not in record.getMessage() for record in caplog.records)
