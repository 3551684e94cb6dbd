"""compat.get_token: the Tesla token owner's /get-token through a real socket, with the real
authorization server: its success and error shapes, a key like every route, and a key
waived only for callers on an explicit trusted network."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.routing import APIRoute

from conftest import BrokerFactory
from support import Served, client_credentials
from tokenbroker import Broker, parse_settings
from tokenbroker.api.app import create_app
from tokenbroker.config import config_warnings
from tokenbroker.core.rules import parse_rule
from tokenbroker.edge.ratelimit import RateLimits
from tokenbroker.engine.consumers import ConsumerRegistry, hash_key, new_key
from tokenbroker.errors import ConfigError
from tokenbroker.testing import AuthorizationServer, Fault

KEY = new_key()
STRANGER_KEY = new_key()


def _served(broker: Broker) -> Served:
    registry = ConsumerRegistry(
        [
            ("scout", hash_key(KEY), [parse_rule("tesla")]),
            ("stranger", hash_key(STRANGER_KEY), [parse_rule("other")]),
        ]
    )
    return Served(create_app(broker, registry, limits=RateLimits(auth_failures="1000/minute")))


@pytest.fixture
def make_served(auth_server: AuthorizationServer, make_broker: BrokerFactory) -> Iterator[Any]:
    """``make_served(**get_token)``: the API with compat.get_token set as given."""
    made: list[Served] = []

    def factory(**get_token: Any) -> Served:
        broker = make_broker(
            {"tesla": client_credentials(auth_server), "other": client_credentials(auth_server)},
            sections={"compat": {"get_token": {"provider": "tesla", **get_token}}},
        )
        served = _served(broker)
        made.append(served)
        return served

    yield factory
    for served in made:
        served.__exit__()


def _key(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_success_has_the_original_shape(
    make_served: Any, auth_server: AuthorizationServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With a key, /get-token answers 200 {status: success, access_token, token_source,
    remaining_minutes} with a token the authorization server accepts, no-store, and the
    audit line names the consumer, never the token."""
    served = make_served()
    with caplog.at_level(logging.INFO):
        response = served.client.get("/get-token", headers=_key())
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"status", "access_token", "token_source", "remaining_minutes"}
    assert body["status"] == "success"
    assert body["token_source"] == "tokenbroker"
    assert body["access_token"] in auth_server.issued_access_tokens
    assert isinstance(body["remaining_minutes"], int)
    assert 0 < body["remaining_minutes"] <= 60
    assert response.headers["cache-control"] == "no-store"
    assert "consumer=scout" in caplog.text
    assert body["access_token"] not in caplog.text


def test_errors_have_the_original_shape(make_served: Any, auth_server: AuthorizationServer) -> None:
    """A provider outage answers 503 {status: error, error, code} with Retry-After; a consumer
    not allowed the provider gets 404 in the same shape; neither carries a token."""
    served = make_served()
    forbidden = served.client.get("/get-token", headers=_key(STRANGER_KEY))
    assert forbidden.status_code == 404
    assert forbidden.json() == {
        "status": "error",
        "error": "no such provider or scope for this key",
        "code": "not_found",
    }
    auth_server.inject(Fault(status=503, body="", headers={"Retry-After": "40"}), times=None)
    down = served.client.get("/get-token", headers=_key())
    assert down.status_code == 503
    body = down.json()
    assert body["status"] == "error" and body["code"] == "provider_unavailable"
    assert isinstance(body["error"], str) and "access_token" not in body
    assert int(down.headers["retry-after"]) >= 40


def test_a_key_is_needed_without_trusted_networks(make_served: Any) -> None:
    """Without trusted_networks, /get-token without a key or with a wrong one answers 401
    in the original's error shape with WWW-Authenticate."""
    served = make_served()
    for headers in ({}, _key("tbk_" + "x" * 43)):
        response = served.client.get("/get-token", headers=headers)
        assert response.status_code == 401
        assert response.json()["status"] == "error"
        assert response.json()["code"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith('Bearer realm="tokenbroker"')


def test_the_key_is_waived_only_from_a_trusted_network(
    make_served: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Loopback listed in trusted_networks: a keyless caller from 127.0.0.1 gets a token
    (audited as compat-trusted-network); another network listed: the same caller gets 401,
    and a forged X-Forwarded-For does not help."""
    trusted = make_served(trusted_networks=["127.0.0.0/8"])
    with caplog.at_level(logging.INFO):
        waived = trusted.client.get("/get-token")
    assert waived.status_code == 200
    assert waived.json()["status"] == "success"
    assert "consumer=compat-trusted-network" in caplog.text
    elsewhere = make_served(trusted_networks=["10.0.0.0/8"])
    refused = elsewhere.client.get("/get-token", headers={"X-Forwarded-For": "10.1.2.3"})
    assert refused.status_code == 401
    assert refused.json()["code"] == "unauthorized"
    assert elsewhere.client.get("/get-token", headers=_key()).status_code == 200


def test_off_by_default_and_at_the_configured_path(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """Without compat: there is no /get-token route; with path /tesla/token the route is
    there and nowhere else."""
    plain = make_broker({"tesla": client_credentials(auth_server)})
    with _served(plain) as client:
        assert client.get("/get-token", headers=_key()).status_code == 404
    moved = make_broker(
        {"tesla": client_credentials(auth_server)},
        sections={"compat": {"get_token": {"provider": "tesla", "path": "/tesla/token"}}},
    )
    served = _served(moved)
    with served as client:
        paths = {r.path for r in served.app.routes if isinstance(r, APIRoute)}
        assert "/tesla/token" in paths and "/get-token" not in paths
        assert client.get("/tesla/token", headers=_key()).json()["status"] == "success"


def test_config_checks(auth_server: AuthorizationServer) -> None:
    """An unknown provider or a path under /v1/ is a config error; trusted_networks is valid
    but check warns that those callers need no key."""
    providers = {"tesla": client_credentials(auth_server)}

    def settings(get_token: dict[str, Any]) -> Any:
        import yaml

        config = {"store": "memory", "providers": providers, "compat": {"get_token": get_token}}
        return parse_settings(yaml.safe_dump(config), {})

    with pytest.raises(ConfigError, match="compat.get_token.provider"):
        settings({"provider": "nope"})
    with pytest.raises(ConfigError, match="path"):
        settings({"provider": "tesla", "path": "/v1/tokens/tesla"})
    assert config_warnings(settings({"provider": "tesla"})) == []
    warned = config_warnings(settings({"provider": "tesla", "trusted_networks": ["10.0.0.0/8"]}))
    assert [w.path for w in warned] == ["compat.get_token.trusted_networks"]
    assert "without a key" in warned[0].message
