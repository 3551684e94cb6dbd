"""What tpp proxy users rely on: /healthz is the /health document, and refresh_check_seconds
above one second is honoured while client timers keep their one-second tick."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import BrokerFactory
from support import client_credentials, login, wait_for
from tokenbroker.config import ProxySettings
from tokenbroker.testing import AuthorizationServer, RecordingUpstream, ServedProxy


@pytest.fixture
def upstream(auth_server: AuthorizationServer) -> Iterator[RecordingUpstream]:
    """An upstream that accepts only tokens the authorization server currently accepts."""
    with RecordingUpstream(auth_server) as served:
        yield served


def _settings(upstream: RecordingUpstream, mode: str, **extra: Any) -> ProxySettings:
    provider = "db" if mode == "pool" else "svc"
    route = {"prefix": "/", "upstream": upstream.url, "provider": provider, "mode": mode}
    return ProxySettings.model_validate({"listen": "127.0.0.1:0", "routes": [route], **extra})


def _without_idle(document: dict[str, Any]) -> dict[str, Any]:
    for route in document["routes"]:
        for credential in route.get("pool", {}).get("credentials", ()):
            credential.pop("idle_seconds")
    return document


def test_healthz_answers_the_health_document(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, upstream: RecordingUpstream
) -> None:
    """The proxy health port's /healthz (tpp's probe path) answers the /health document,
    status word and pool counts included, not a bare liveness answer."""
    broker = make_broker({"db": login(auth_server)})
    with (
        ServedProxy(broker, _settings(upstream, "pool")) as proxy,
        httpx.Client(base_url=proxy.health_url) as probe,
    ):
        healthz = probe.get("/healthz")
        health = probe.get("/health")
        assert healthz.status_code == health.status_code == 200
        assert healthz.headers["content-type"] == "application/json"
        assert _without_idle(healthz.json()) == _without_idle(health.json())
        assert healthz.json()["status"] == "ok"
        assert healthz.json()["pool"]["total"] == 2
        assert probe.get("/livez").json() == {"status": "ok"}


def test_refresh_check_seconds_above_one_second_is_honoured(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, upstream: RecordingUpstream
) -> None:
    """With refresh_check_seconds: 2.5 the proxy's first refresh check (which fetches the
    required provider) comes after about 2.5 s, not after the old 1 s cap, and fetches once."""
    broker = make_broker({"svc": client_credentials(auth_server, required=True)})
    before = auth_server.count("client_credentials")
    settings = _settings(upstream, "shared", refresh_check_seconds=2.5)
    with ServedProxy(broker, settings):
        waited = wait_for(
            lambda: auth_server.count("client_credentials") > before, "the refresh check"
        )
        assert 2.0 <= waited < 8.0, waited
        assert auth_server.count("client_credentials") == before + 1


def test_client_timers_keep_their_tick_with_a_slow_refresh_check(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, upstream: RecordingUpstream
) -> None:
    """With refresh_check_seconds: 60 an idle keep-alive client is still closed about
    client_keepalive_seconds (0.5 s) after its answer, within the 1 s tick."""
    broker = make_broker({"svc": client_credentials(auth_server)})
    settings = _settings(upstream, "shared", refresh_check_seconds=60, client_keepalive_seconds=0.5)
    with ServedProxy(broker, settings) as proxy:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as idle:
            idle.sendall(b"GET /api/echo HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += idle.recv(65536)
            answered = time.monotonic()
            while idle.recv(65536):  # until the proxy closes the connection
                pass
            waited = time.monotonic() - answered
    assert data.startswith(b"HTTP/1.1 200 ")
    assert 0.4 < waited < 2.5, waited


def _families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(text)}


@pytest.mark.parametrize("compat", ["tpp", None])
def test_metrics_compat_tpp_exports_tpp_gauges_beside_ours(
    compat: str | None,
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    upstream: RecordingUpstream,
) -> None:
    """With proxy.metrics_compat: tpp the health port's /metrics also has tpp's four
    unlabelled gauges (tpp_tokens_total, _in_use, _available, tpp_requests_waiting) with
    the pool's figures while a client holds a lease; without it there is no tpp_* line.
    tokenbroker_* stays the same either way."""
    broker = make_broker({"db": login(auth_server)})
    extra = {"metrics_compat": compat} if compat else {}
    with (
        ServedProxy(broker, _settings(upstream, "pool", **extra)) as proxy,
        httpx.Client(base_url=proxy.url) as holder,
    ):
        assert holder.get("/api/echo").status_code == 200  # keep-alive: holds one account
        text = httpx.get(proxy.health_url + "/metrics").text
    families = _families(text)
    assert 'tokenbroker_pool_tokens{route="/",state="in_use"} 1.0' in text
    if compat is None:
        assert "tpp_" not in text
        return
    expected = {
        "tpp_tokens_total": 2,
        "tpp_tokens_in_use": 1,
        "tpp_tokens_available": 1,
        "tpp_requests_waiting": 0,
    }
    for name, value in expected.items():
        family = families[name]
        assert family.type == "gauge"
        [sample] = family.samples
        assert sample.name == name
        assert sample.labels == {}
        assert sample.value == value
    assert "# HELP tpp_tokens_total Total number of tokens in the pool" in text


def test_metrics_compat_refuses_an_unknown_system() -> None:
    """metrics_compat names a system the broker can imitate (tpp) or nothing."""
    route = {"prefix": "/", "upstream": "http://db.example", "provider": "db"}
    with pytest.raises(ValueError, match="metrics_compat"):
        ProxySettings.model_validate({"routes": [route], "metrics_compat": "grafana"})


def test_one_credential_with_sessions_pools_that_many_logins(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, upstream: RecordingUpstream
) -> None:
    """A credential with sessions: 3 (tpp's pool_size for its one credential) is logged in
    three times with its own username, and three client connections held at once each
    present a different token."""
    provider = login(auth_server, credentials=[{"username": "alice", "password": "alice-pw"}])
    provider["credentials"][0]["sessions"] = 3
    broker = make_broker({"db": provider})
    assert broker.accounts("db") == ["alice", "alice#2", "alice#3"]
    holders = [httpx.Client() for _ in range(3)]
    try:
        with ServedProxy(broker, _settings(upstream, "pool")) as proxy:
            assert proxy.stats().total == 3
            for client in holders:
                assert client.get(proxy.url + "/api/echo").status_code == 200
            assert proxy.stats().in_use == 3
    finally:
        for client in holders:
            client.close()
    logins = [r for r in auth_server.requests if r.grant == "login"]
    assert [r.json["username"] for r in logins] == ["alice"] * 3
    tokens = {record.token for record in upstream.records()}
    assert len(tokens) == 3
    assert tokens <= set(auth_server.issued_login_tokens)


def test_sessions_that_collide_with_an_account_are_refused() -> None:
    """alice with sessions: 2 names alice#2, so an account named alice#2 is listed twice."""
    from tokenbroker.config import LoginProvider

    accounts = [
        {"username": "alice", "password": "a", "sessions": 2},
        {"username": "alice#2", "password": "b"},
    ]
    with pytest.raises(ValueError, match="listed twice"):
        LoginProvider.model_validate(
            {"grant": "login", "login_url": "http://db.example/api/login", "credentials": accounts}
        )
