"""Shared fixtures: a real authorization server on 127.0.0.1 and brokers configured for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from support import CLIENT_ID, CLIENT_SECRET, client_credentials, login
from tokenbroker import Broker, parse_settings
from tokenbroker.testing import AuthorizationServer

# The real PostgreSQL server fixtures (postgres_server, pg_url).
pytest_plugins = ["pg"]


@pytest.fixture
def auth_server() -> Iterator[AuthorizationServer]:
    """A started authorization server with one client-credentials client and two login accounts."""
    server = AuthorizationServer(expires_in=3600)
    server.add_client(CLIENT_ID, CLIENT_SECRET, scopes=["read", "write"])
    server.add_client("rt-client", None, auth_method="none", scopes=["read"])
    server.add_account("alice", "alice-pw")
    server.add_account("bob", "bob-pw")
    with server:
        yield server


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def make_broker(auth_server: AuthorizationServer) -> Iterator[BrokerFactory]:
    """Build brokers for ``auth_server``: ``make_broker(providers, defaults=..., sections=...,
    **kw)`` (``sections``: more top-level config sections, e.g. ``compat``)."""
    made: list[Broker] = []

    def factory(
        providers: dict[str, dict[str, Any]] | None = None,
        *,
        defaults: dict[str, Any] | None = None,
        sections: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Broker:
        config = {
            "store": "memory",
            "defaults": {"retries": 2, "backoff_seconds": 0.01, **(defaults or {})},
            "providers": providers or {"svc": client_credentials(auth_server)},
            **(sections or {}),
        }
        broker = Broker(parse_settings(yaml.safe_dump(config), {}), **kwargs)
        made.append(broker)
        return broker

    yield factory
    for broker in made:
        broker.close()


POOL_ACCOUNTS = [("alice", "alice-pw"), ("bob", "bob-pw"), ("carol", "carol-pw")]


@pytest.fixture
def pool_broker(auth_server: AuthorizationServer, make_broker: BrokerFactory) -> Broker:
    """A broker with a login provider ``db`` over the accounts alice, bob and carol."""
    auth_server.add_account("carol", "carol-pw")
    credentials = [{"username": u, "password": p} for u, p in POOL_ACCOUNTS]
    return make_broker({"db": login(auth_server, credentials=credentials)})
