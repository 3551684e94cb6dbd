"""One error table: the API, the proxy and BrokerClient answer and read every failure alike."""

from __future__ import annotations

import inspect
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support import Served, client_credentials, refresh_token
from tokenbroker import Broker, BrokerClient, errors, parse_settings
from tokenbroker.api.app import create_app
from tokenbroker.api.errors import error_response
from tokenbroker.config import ProxySettings
from tokenbroker.core.crypto import generate_key
from tokenbroker.core.rules import parse_rule
from tokenbroker.edge.statuses import ERROR_STATUS, status_for_code, status_of
from tokenbroker.engine.consumers import ConsumerRegistry, hash_key, new_key
from tokenbroker.proxy.http import domain_error, error_reply
from tokenbroker.testing import AuthorizationServer, Fault, RecordingUpstream, ServedProxy

KEY = new_key()


def _instance(kind: type[errors.TokenBrokerError]) -> errors.TokenBrokerError:
    if kind is errors.ConfigError:
        return kind([errors.ConfigProblem("x", "y")])  # type: ignore[call-arg]
    if kind is errors.InvalidJobParamsError:
        return kind("x", "a failure")
    return kind("a failure")


ERROR_CLASSES = sorted(
    (
        kind
        for _, kind in inspect.getmembers(errors, inspect.isclass)
        if issubclass(kind, errors.TokenBrokerError)
    ),
    key=lambda kind: kind.__name__,
)


def _proxy_answer(reply: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_the_table_maps_each_domain_error_to_its_own_class() -> None:
    """Each row's class is the one BrokerClient raises for its code (a round trip), and the
    statuses are DESIGN §3.3's."""
    assert ERROR_STATUS
    for kind, row in ERROR_STATUS:
        assert row.error is kind, row.code
        assert getattr(kind, "code", row.code) == row.code  # the class's own code agrees
    statuses = {row.code: row.status for _, row in ERROR_STATUS}
    assert statuses == {
        "too_many_scopes": 400,
        "invalid_delegation": 400,
        "forbidden_subject": 403,
        "not_found": 404,
        "reauthorization_required": 409,
        "provider_misconfigured": 500,
        "pool_exhausted": 503,
        "delegation_failed": 502,
        "provider_unavailable": 503,
        "store_unavailable": 503,
        "unknown_job_kind": 400,
        "invalid_job_params": 400,
        "job_not_found": 404,
        "job_not_retryable": 409,
        "too_many_jobs": 429,
    }


@pytest.mark.parametrize("kind", ERROR_CLASSES, ids=lambda kind: kind.__name__)
def test_every_error_gets_the_same_answer_from_api_proxy_and_client(
    kind: type[errors.TokenBrokerError],
) -> None:
    """For every error class: the API's and the proxy's status, code, message and Retry-After
    are the table's, and BrokerClient reading the API's answer raises the row's class."""
    exc = _instance(kind)
    row = status_of(exc)
    api = error_response(exc)
    api_body = json.loads(bytes(api.body))
    proxy_status, code, message, after = domain_error(exc)
    status, headers, body = _proxy_answer(
        error_reply(proxy_status, code, message, retry_after=after)
    )
    assert api.status_code == status == row.status
    # Job request rows answer with the error's own fixed sentence (naming a kind or a field).
    message = str(exc) if row.detailed else row.message
    assert api_body == body == {"error": {"code": row.code, "message": message}}
    assert api.headers.get("retry-after") == headers.get("retry-after")
    assert ("retry-after" in headers) is row.retry_after
    assert headers["cache-control"] == "no-store"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(api.status_code, headers=dict(api.headers), content=bytes(api.body))

    transport = httpx.MockTransport(answer)
    with (
        BrokerClient("http://broker", api_key=KEY, transport=transport) as client,
        pytest.raises(errors.TokenBrokerError) as raised,
    ):
        client.get_token("svc")
    assert type(raised.value) is row.error


def test_broker_client_reads_the_apis_408_as_retryable() -> None:
    """The API's 408 ``request_timeout`` (a request that did not arrive in time) is a row of the
    table, and BrokerClient raises ProviderUnavailableError for it (sending again may work),
    not the ProviderMisconfiguredError of an unexpected answer."""
    row = status_for_code("request_timeout")
    assert row is not None
    assert row.status == 408

    def answer(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": row.code, "message": row.message}}
        return httpx.Response(408, json=body, headers={"connection": "close"})

    transport = httpx.MockTransport(answer)
    with (
        BrokerClient("http://broker", api_key=KEY, transport=transport) as client,
        pytest.raises(errors.TokenBrokerError) as raised,
    ):
        client.get_token("svc")
    assert type(raised.value) is errors.ProviderUnavailableError
    assert "HTTP 408 request_timeout" in str(raised.value)


# -- real failures, end to end ----------------------------------------------------------------


class Surfaces:
    """One broker on a SQLite file behind the API (and a BrokerClient) and the proxy."""

    def __init__(self, db: Path, api: Served, proxy: ServedProxy) -> None:
        self.db = db
        self.api = api
        self.proxy = proxy
        self.lockers: list[sqlite3.Connection] = []


@pytest.fixture
def surfaces(tmp_path: Path, auth_server: AuthorizationServer) -> Iterator[Surfaces]:
    db = tmp_path / "tokenbroker.db"
    config = {
        "store": f"sqlite:///{db}",
        "encryption_keys": [generate_key()],
        "defaults": {"retries": 0, "store_busy_timeout_seconds": 0.2},
        "providers": {
            "svc": client_credentials(auth_server),
            "rt": refresh_token(auth_server, auth_server.issue_refresh_token("rt-client")),
        },
    }
    broker = Broker(parse_settings(yaml.safe_dump(config), {}))
    registry = ConsumerRegistry([("etl", hash_key(KEY), [parse_rule("svc"), parse_rule("rt")])])
    try:
        with RecordingUpstream(auth_server) as upstream:
            routes = [
                {
                    "prefix": f"/{name}/",
                    "upstream": upstream.url + "/api/",
                    "provider": name,
                    "mode": "shared",
                }
                for name in ("svc", "rt")
            ]
            settings = ProxySettings.model_validate({"listen": "127.0.0.1:0", "routes": routes})
            api = Served(create_app(broker, registry))
            with api, ServedProxy(broker, settings, warm=False) as proxy:
                surfaces = Surfaces(db, api, proxy)
                try:
                    yield surfaces
                finally:
                    for locker in surfaces.lockers:
                        locker.close()
    finally:
        broker.close()


def _dead_refresh_token(surfaces: Surfaces, auth_server: AuthorizationServer) -> str:
    auth_server.inject(Fault(status=400, body='{"error":"invalid_grant"}'), times=None)
    return "rt"


def _misconfigured(surfaces: Surfaces, auth_server: AuthorizationServer) -> str:
    auth_server.inject(Fault(status=401, body='{"error":"invalid_client"}'), times=None)
    return "svc"


def _unavailable(surfaces: Surfaces, auth_server: AuthorizationServer) -> str:
    auth_server.inject(Fault(status=503, body="", headers={"Retry-After": "40"}), times=None)
    return "svc"


def _store_locked(surfaces: Surfaces, auth_server: AuthorizationServer) -> str:
    locker = sqlite3.connect(surfaces.db, isolation_level=None)  # another writer holds the lock
    locker.execute("BEGIN IMMEDIATE")
    surfaces.lockers.append(locker)
    return "svc"


@pytest.mark.parametrize(
    ("case", "status", "code", "error"),
    [
        (_dead_refresh_token, 409, "reauthorization_required", errors.ReauthorizationRequiredError),
        (_misconfigured, 500, "provider_misconfigured", errors.ProviderMisconfiguredError),
        (_unavailable, 503, "provider_unavailable", errors.ProviderUnavailableError),
        (_store_locked, 503, "store_unavailable", errors.StoreError),
    ],
    ids=["reauthorization", "misconfigured", "unavailable", "store"],
)
def test_real_failures_get_the_same_answer_from_api_proxy_and_client(
    surfaces: Surfaces,
    auth_server: AuthorizationServer,
    caplog: pytest.LogCaptureFixture,
    case: Any,
    status: int,
    code: str,
    error: type[errors.TokenBrokerError],
) -> None:
    """A real provider or store failure on a token fetch: the proxy answers promptly with the
    API's status, code and Retry-After (no hung client, no task exception left unretrieved),
    and BrokerClient raises the table's class."""
    caplog.set_level(logging.WARNING)
    provider = case(surfaces, auth_server)
    started = time.monotonic()
    with httpx.Client(base_url=surfaces.proxy.url, timeout=5) as client:
        proxied = client.get(f"/{provider}/echo")
    assert time.monotonic() - started < 4
    api = surfaces.api.client.get(
        f"/v1/tokens/{provider}", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert proxied.status_code == api.status_code == status
    assert proxied.json()["error"]["code"] == api.json()["error"]["code"] == code
    assert proxied.headers.get("retry-after") == api.headers.get("retry-after")
    with (
        BrokerClient(surfaces.api.url, api_key=KEY) as broker_client,
        pytest.raises(errors.TokenBrokerError) as raised,
    ):
        broker_client.get_token(provider)
    assert type(raised.value) is error
    assert "never retrieved" not in caplog.text
