"""httpx and requests adapters: bearer attached, one invalidate-and-retry on 401, only for replayable bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import requests

from conftest import BrokerFactory
from tokenbroker.client.httpx_auth import is_replayable
from tokenbroker.testing import AuthorizationServer


def test_httpx_auth_sync_retries_once_with_fresh_token(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """A revoked token gets a 401; the adapter invalidates, fetches one new token and retries once."""
    broker = make_broker()
    auth = broker.httpx_auth("svc")
    with httpx.Client(auth=auth) as client:
        assert client.get(auth_server.resource_url).status_code == 200
        auth_server.revoke_access_token(broker.get_token("svc").access_token)
        response = client.get(auth_server.resource_url)
    assert response.status_code == 200
    assert auth_server.count("client_credentials") == 2
    assert auth_server.resource_count() == 3


def test_httpx_auth_async_retries_once_with_fresh_token(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """The same auth object works on an AsyncClient, with the same single retry."""
    broker = make_broker()

    async def main() -> int:
        async with httpx.AsyncClient(auth=broker.httpx_auth("svc")) as client:
            await client.get(auth_server.resource_url)
            auth_server.revoke_access_token((await broker.aget_token("svc")).access_token)
            return (await client.get(auth_server.resource_url)).status_code

    assert asyncio.run(main()) == 200
    assert auth_server.count("client_credentials") == 2
    assert auth_server.resource_count() == 3


def test_httpx_auth_gives_up_after_one_retry(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """When the fresh token is rejected too, the 401 is returned: no loop."""
    broker = make_broker()
    with httpx.Client(auth=broker.httpx_auth("svc")) as client:
        client.get(auth_server.resource_url)
        auth_server.expire_all_access_tokens()
        auth_server.inject(Fault401(), times=None, path="/api/resource")
        response = client.get(auth_server.resource_url)
    assert response.status_code == 401
    assert auth_server.resource_count() == 3
    assert auth_server.count("client_credentials") == 2


def Fault401():  # noqa: N802 - reads like the Fault it builds
    from tokenbroker.testing import Fault

    return Fault(status=401, body="", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def test_httpx_auth_does_not_replay_a_streamed_body(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """A 401 on a request whose body is a stream is passed through without a retry."""
    broker = make_broker()

    def body() -> Iterator[bytes]:
        yield b"chunk"

    with httpx.Client(auth=broker.httpx_auth("svc")) as client:
        client.get(auth_server.resource_url)
        auth_server.revoke_access_token(broker.get_token("svc").access_token)
        response = client.post(auth_server.resource_url, content=body())
    assert response.status_code == 401
    assert auth_server.count("client_credentials") == 1


def test_is_replayable() -> None:
    """Bytes, form and JSON bodies are replayable; generators are not."""
    assert is_replayable(httpx.Request("POST", "http://x", content=b"abc"))
    assert is_replayable(httpx.Request("POST", "http://x", json={"a": 1}))
    assert is_replayable(httpx.Request("GET", "http://x"))
    assert not is_replayable(httpx.Request("POST", "http://x", content=iter([b"a"])))


def test_requests_auth_retries_once_with_fresh_token(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """requests: a 401 leads to one invalidate, one new token and one retry that succeeds."""
    broker = make_broker()
    auth = broker.requests_auth("svc")
    with requests.Session() as session:
        assert session.get(auth_server.resource_url, auth=auth, timeout=5).status_code == 200
        auth_server.revoke_access_token(broker.get_token("svc").access_token)
        response = session.get(auth_server.resource_url, auth=auth, timeout=5)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert auth_server.count("client_credentials") == 2


def test_requests_auth_does_not_replay_a_streamed_body(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """requests: a generator body is not replayed after a 401."""
    broker = make_broker()
    auth = broker.requests_auth("svc")
    auth_server.expire_all_access_tokens()
    with requests.Session() as session:
        session.get(auth_server.resource_url, auth=auth, timeout=5)
        auth_server.revoke_access_token(broker.get_token("svc").access_token)
        response = session.post(
            auth_server.resource_url, data=(c for c in [b"a", b"b"]), auth=auth, timeout=5
        )
    assert response.status_code == 401
    assert repr(auth).startswith("RequestsBrokerAuth(")


def test_adapters_reject_unknown_provider_up_front(make_broker: BrokerFactory) -> None:
    """Building an adapter for an unknown provider fails immediately, not at the first request."""
    import pytest

    from tokenbroker import UnknownProviderError

    broker = make_broker()
    with pytest.raises(UnknownProviderError):
        broker.httpx_auth("nope")
    with pytest.raises(UnknownProviderError):
        broker.requests_auth("nope")


def test_upstream_that_always_answers_401_forces_one_fetch_per_cooldown(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """An upstream rejecting every token: 20 requests through the httpx and requests adapters
    within the invalidate cooldown cause one forced token request, not one per 401."""
    broker = make_broker()
    auth_server.inject(Fault401(), times=None, path="/api/resource")
    with httpx.Client(auth=broker.httpx_auth("svc")) as client:
        statuses = [client.get(auth_server.resource_url).status_code for _ in range(10)]
    with requests.Session() as session:
        auth = broker.requests_auth("svc")
        statuses += [
            session.get(auth_server.resource_url, auth=auth).status_code for _ in range(10)
        ]
    assert statuses == [401] * 20
    assert auth_server.count("client_credentials") == 2
