"""BrokerClient against a real broker app on 127.0.0.1: one read per cold key, hits without I/O, 401s."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import BrokerFactory
from support import Served, client_credentials, refresh_token, stampede
from tokenbroker import (
    Broker,
    ClientAuthenticationError,
    InvalidTokenError,
    ManualClock,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    Token,
    TokenBrokerError,
    UnknownProviderError,
)
from tokenbroker.api.app import create_app
from tokenbroker.client.remote import BrokerClient
from tokenbroker.core.rules import parse_rule
from tokenbroker.edge.ratelimit import RateLimits
from tokenbroker.engine.consumers import ConsumerRegistry, hash_key, new_key
from tokenbroker.testing import AuthorizationServer, Fault

KEY = new_key()
READ = ("GET", "/v1/tokens/svc")
REPORT = ("POST", "/v1/tokens/svc/invalidate")


class CountingTransport(httpx.HTTPTransport):
    """A real transport that records every request a client sends, as ``(method, path)``."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return super().handle_request(request)


@pytest.fixture
def broker(auth_server: AuthorizationServer, make_broker: BrokerFactory) -> Broker:
    seed = auth_server.issue_refresh_token("rt-client")
    return make_broker(
        {
            "svc": client_credentials(auth_server),
            "secret-svc": client_credentials(auth_server),
            "rt": refresh_token(auth_server, seed),
        }
    )


@pytest.fixture
def served(broker: Broker) -> Iterator[Served]:
    registry = ConsumerRegistry([("etl", hash_key(KEY), [parse_rule("svc"), parse_rule("rt")])])
    served = Served(create_app(broker, registry, limits=RateLimits(auth_failures="1000/minute")))
    with served:
        yield served


@pytest.fixture
def transport() -> CountingTransport:
    return CountingTransport()


@pytest.fixture
def client(served: Served, transport: CountingTransport) -> Iterator[BrokerClient]:
    with BrokerClient(served.url, api_key=KEY, transport=transport) as client:
        yield client


def metric(served: Served, name: str, **labels: str) -> float:
    """Sum of the broker's ``name`` samples whose labels include ``labels`` (from /metrics)."""
    text = served.client.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def reads(served: Served) -> float:
    """Token reads the broker's app served for ``svc``."""
    return metric(served, "tokenbroker_token_reads_total", provider="svc")


def reports(served: Served) -> float:
    """Invalidate calls the broker's app answered."""
    return metric(
        served, "tokenbroker_consumer_requests_total", route="/v1/tokens/{provider}/invalidate"
    )


def test_two_hundred_threads_on_a_cold_key_make_one_broker_read(
    served: Served,
    client: BrokerClient,
    transport: CountingTransport,
    auth_server: AuthorizationServer,
) -> None:
    """200 threads on a cold key: one GET to the broker, one token request to the IdP."""
    auth_server.latency = 0.1
    results = stampede(200, lambda: client.get_token("svc"))
    assert all(isinstance(r, Token) for r in results)
    assert len({r.access_token for r in results}) == 1  # type: ignore[union-attr]
    assert transport.sent == [READ]
    assert reads(served) == 1
    assert auth_server.count("client_credentials") == 1


def test_cached_hits_make_no_http_calls(
    served: Served, client: BrokerClient, transport: CountingTransport
) -> None:
    """After the first read, 1000 gets are local; scope spellings of one key share its token."""
    first = client.get_token("svc")
    for _ in range(1000):
        assert client.get_token("svc") is first
    assert transport.sent == [READ]
    both = {
        client.get_token("svc", "write read").access_token,
        client.get_token("svc", "read  write").access_token,
        client.get_token("svc", ["read", "write"]).access_token,
    }
    assert len(both) == 1
    assert transport.sent == [READ, READ]
    assert reads(served) == 2


def test_token_carries_the_brokers_expiry(client: BrokerClient) -> None:
    """The token's type, scope and expiry are the broker's (expires_at within a second or two)."""
    token = client.get_token("svc")
    assert token.token_type == "Bearer"
    assert token.scope == "read"
    assert 3590 <= token.expires_at - time.time() <= 3600


def test_expiry_minus_skew_triggers_a_new_read(served: Served) -> None:
    """A token is served until its expiry minus the skew; after that the next get reads again."""
    clock = ManualClock(start=time.time())
    with BrokerClient(served.url, api_key=KEY, skew=100, refresh_ahead=1.0, clock=clock) as client:
        client.get_token("svc")
        clock.advance(3398)  # the broker said expires_in 3599 or 3600: still > 100 s left
        client.get_token("svc")
        assert reads(served) == 1
        clock.advance(3501 - 3398)  # now within 100 s of expiry
        client.get_token("svc")
        assert reads(served) == 2


def test_refresh_ahead_reads_in_the_background(
    served: Served, transport: CountingTransport
) -> None:
    """Past 80% of the life the caller gets the current token at once; one background read follows."""
    clock = ManualClock(start=time.time())
    with BrokerClient(served.url, api_key=KEY, clock=clock, transport=transport) as client:
        first = client.get_token("svc")
        clock.advance(2881)
        assert client.get_token("svc") is first
        deadline = time.monotonic() + 10
        while client.get_token("svc") is first and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get_token("svc") is not first
    assert transport.sent == [READ, READ]
    assert reads(served) == 2


def test_httpx_auth_on_a_401_reports_once_and_retries_once(
    served: Served,
    client: BrokerClient,
    transport: CountingTransport,
    auth_server: AuthorizationServer,
) -> None:
    """A revoked token: one invalidate call (no extra read), one new IdP token, one good retry."""
    with httpx.Client(auth=client.httpx_auth("svc")) as http:
        assert http.get(auth_server.resource_url).status_code == 200
        rejected = client.get_token("svc").access_token
        auth_server.revoke_access_token(rejected)
        response = http.get(auth_server.resource_url)
    assert response.status_code == 200
    assert auth_server.resource_count() == 3
    assert auth_server.count("client_credentials") == 2
    assert transport.sent == [READ, REPORT]
    assert reports(served) == 1
    assert reads(served) == 1
    assert metric(served, "tokenbroker_invalidations_total", provider="svc") == 1
    assert client.get_token("svc").access_token != rejected
    assert len(transport.sent) == 2


def test_async_httpx_auth_on_a_401_reports_once_and_retries_once(
    served: Served, transport: CountingTransport, auth_server: AuthorizationServer
) -> None:
    """The same adapter on an AsyncClient: one invalidate call and one good retry."""

    async def main() -> int:
        async with (
            BrokerClient(served.url, api_key=KEY, transport=transport) as client,
            httpx.AsyncClient(auth=client.httpx_auth("svc")) as http,
        ):
            await http.get(auth_server.resource_url)
            auth_server.revoke_access_token((await client.aget_token("svc")).access_token)
            return (await http.get(auth_server.resource_url)).status_code

    assert asyncio.run(main()) == 200
    assert auth_server.resource_count() == 3
    assert auth_server.count("client_credentials") == 2
    assert transport.sent == [READ, REPORT]
    assert reports(served) == 1


def test_requests_auth_on_a_401_reports_once_and_retries_once(
    served: Served,
    client: BrokerClient,
    transport: CountingTransport,
    auth_server: AuthorizationServer,
) -> None:
    """requests: a 401 leads to one invalidate call and one retry that succeeds."""
    auth = client.requests_auth("svc")
    with requests.Session() as session:
        assert session.get(auth_server.resource_url, auth=auth, timeout=5).status_code == 200
        auth_server.revoke_access_token(client.get_token("svc").access_token)
        response = session.get(auth_server.resource_url, auth=auth, timeout=5)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert auth_server.resource_count() == 3
    assert auth_server.count("client_credentials") == 2
    assert transport.sent == [READ, REPORT]
    assert reports(served) == 1


def test_fifty_threads_reporting_one_token_make_one_invalidate_call(
    served: Served,
    client: BrokerClient,
    transport: CountingTransport,
    auth_server: AuthorizationServer,
) -> None:
    """50 threads report the same rejected token and get again: one invalidate call, one new token."""
    rejected = client.get_token("svc").access_token
    assert client.invalidate("svc", "some-older-token") is False
    auth_server.latency = 0.05

    def report() -> tuple[bool, str]:
        dropped = client.invalidate("svc", rejected)
        return dropped, client.get_token("svc").access_token

    results = stampede(50, report)
    assert sum(r[0] for r in results) == 1  # type: ignore[index]
    fresh = {r[1] for r in results}  # type: ignore[index]
    assert len(fresh) == 1
    assert rejected not in fresh
    assert transport.sent == [READ, REPORT]
    assert reports(served) == 1
    assert auth_server.count("client_credentials") == 2


def test_a_failed_report_is_sent_again_not_replaced_by_a_read(
    served: Served,
    transport: CountingTransport,
    auth_server: AuthorizationServer,
) -> None:
    """If the invalidate call fails, the next fetch reports the token again instead of reading."""
    clock = ManualClock(start=time.time())
    with BrokerClient(served.url, api_key=KEY, clock=clock, transport=transport) as client:
        rejected = client.get_token("svc").access_token
        assert client.invalidate("svc", rejected)
        auth_server.inject(Fault(status=503, body=""), times=3)
        with pytest.raises(ProviderUnavailableError):
            client.get_token("svc")
        time.sleep(1.1)  # the broker's own backoff after its failed refresh
        clock.advance(60)  # the client's remembered error, Retry-After included
        assert client.get_token("svc").access_token != rejected
    assert transport.sent == [READ, REPORT, REPORT]
    assert reads(served) == 1


def test_async_two_hundred_tasks_make_one_broker_read(
    served: Served, transport: CountingTransport, auth_server: AuthorizationServer
) -> None:
    """200 asyncio tasks on a cold key: one GET to the broker and one IdP request; then hits."""
    auth_server.latency = 0.1

    async def main() -> set[str]:
        async with BrokerClient(served.url, api_key=KEY, transport=transport) as client:
            tokens = await asyncio.gather(*(client.aget_token("svc") for _ in range(200)))
            tokens.append(await client.aget_token("svc"))
        return {t.access_token for t in tokens}

    assert len(asyncio.run(main())) == 1
    assert transport.sent == [READ]
    assert reads(served) == 1
    assert auth_server.count("client_credentials") == 1


def _bad_key(served: Served, auth_server: AuthorizationServer) -> tuple[str, str]:
    return new_key(), "svc"


def _unknown(served: Served, auth_server: AuthorizationServer) -> tuple[str, str]:
    return KEY, "nope"


def _forbidden(served: Served, auth_server: AuthorizationServer) -> tuple[str, str]:
    return KEY, "secret-svc"


def _dead_refresh_token(served: Served, auth_server: AuthorizationServer) -> tuple[str, str]:
    auth_server.inject(Fault(status=400, body='{"error":"invalid_grant"}'), times=None)
    return KEY, "rt"


def _misconfigured(served: Served, auth_server: AuthorizationServer) -> tuple[str, str]:
    auth_server.inject(Fault(status=401, body='{"error":"invalid_client"}'), times=None)
    return KEY, "svc"


def _unavailable(served: Served, auth_server: AuthorizationServer) -> tuple[str, str]:
    auth_server.inject(Fault(status=503, body="", headers={"Retry-After": "40"}), times=None)
    return KEY, "svc"


Case = Callable[[Served, AuthorizationServer], tuple[str, str]]


@pytest.mark.parametrize(
    ("case", "status", "error"),
    [
        (_bad_key, 401, ClientAuthenticationError),
        (_unknown, 404, UnknownProviderError),
        (_forbidden, 404, UnknownProviderError),
        (_dead_refresh_token, 409, ReauthorizationRequiredError),
        (_misconfigured, 500, ProviderMisconfiguredError),
        (_unavailable, 503, ProviderUnavailableError),
    ],
)
def test_broker_error_statuses_map_to_domain_errors(
    served: Served,
    auth_server: AuthorizationServer,
    case: Case,
    status: int,
    error: type[TokenBrokerError],
) -> None:
    """401/404/409/500/503 from the broker raise exactly their domain error, without the key."""
    key, provider = case(served, auth_server)
    with BrokerClient(served.url, api_key=key) as client, pytest.raises(error) as raised:
        client.get_token(provider)
    exc = raised.value
    assert type(exc) is error
    assert key not in f"{exc} {exc!r}"
    if isinstance(exc, TokenBrokerError) and hasattr(exc, "status_code"):
        assert exc.status_code == status
    if isinstance(exc, ProviderUnavailableError):
        assert exc.retry_after is not None
        assert exc.retry_after >= 40


def test_connection_refused_and_timeouts_are_provider_unavailable(
    served: Served, auth_server: AuthorizationServer
) -> None:
    """No listener and a broker slower than the timeout both raise ProviderUnavailableError."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with (
        BrokerClient(f"http://127.0.0.1:{port}", api_key=KEY) as nobody,
        pytest.raises(ProviderUnavailableError, match="could not connect") as refused,
    ):
        nobody.get_token("svc")
    assert refused.value.sent is False
    auth_server.latency = 0.5
    with (
        BrokerClient(served.url, api_key=KEY, timeout=0.1) as slow,
        pytest.raises(ProviderUnavailableError, match="timed out"),
    ):
        slow.get_token("svc")


def _token_body(**fields: object) -> bytes:
    body = {"access_token": "abc", "token_type": "Bearer", "expires_in": 60, **fields}
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (200, b"not json", ProviderUnavailableError),
        (200, b"[]", ProviderUnavailableError),
        (200, b"[" * 100_000, ProviderUnavailableError),
        (200, _token_body(access_token="a b"), InvalidTokenError),
        (200, _token_body(access_token="ab\r\nX-Evil: 1"), InvalidTokenError),
        (200, _token_body(access_token=None), InvalidTokenError),
        (200, _token_body(token_type="Bearer\n"), InvalidTokenError),
        (200, _token_body(expires_in="soon"), ProviderUnavailableError),
        (200, _token_body(expires_in=0), ProviderUnavailableError),
        (200, _token_body(expires_in=True), ProviderUnavailableError),
        (200, _token_body(scope=["read"]), ProviderUnavailableError),
        (200, b" " * (2 << 20), ProviderUnavailableError),
        (502, b"<html>bad gateway</html>", ProviderUnavailableError),
        (429, b'{"error": {"code": "rate_limited", "message": "x"}}', ProviderUnavailableError),
        (
            400,
            b'{"error": {"code": "invalid_request", "message": "x"}}',
            ProviderMisconfiguredError,
        ),
    ],
)
def test_malformed_and_unexpected_answers(status: int, body: bytes, error: type[Exception]) -> None:
    """Bodies that are not a safe token, and statuses outside the table, raise classified errors."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    with (
        BrokerClient("http://broker", api_key=KEY, transport=transport) as client,
        pytest.raises(error) as raised,
    ):
        client.get_token("svc")
    assert type(raised.value) is error
    assert "abc" not in str(raised.value)


def test_protocol_errors_are_provider_unavailable() -> None:
    """A transport failure other than connect/timeout is a ProviderUnavailableError naming it."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    transport = httpx.MockTransport(handler)
    with (
        BrokerClient("http://broker", api_key=KEY, transport=transport) as client,
        pytest.raises(ProviderUnavailableError, match="RemoteProtocolError") as raised,
    ):
        client.get_token("svc")
    assert isinstance(raised.value.__cause__, httpx.RemoteProtocolError)


def test_redirects_are_never_followed() -> None:
    """A 307 from the 'broker' is an error; the key is never sent to the redirect target."""
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(307, headers={"Location": "http://evil.example/v1/tokens/svc"})

    transport = httpx.MockTransport(handler)
    with (
        BrokerClient("http://broker/prefix", api_key=KEY, transport=transport) as client,
        pytest.raises(ProviderMisconfiguredError, match="307"),
    ):
        client.get_token("svc")
    assert [str(url) for url in seen] == ["http://broker/prefix/v1/tokens/svc"]


def test_requests_send_names_in_the_query_and_the_key_only_as_bearer() -> None:
    """GET sends scope/account as query parameters and the API key only in Authorization."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=_token_body(access_token=f"tok{len(seen)}"))

    transport = httpx.MockTransport(handler)
    with BrokerClient("http://broker", api_key=KEY, transport=transport) as client:
        db = client.get_token("db", account="alice")
        assert client.invalidate("db", db.access_token, account="alice")
        client.get_token("db", account="alice")
        token = client.get_token("svc", "write read")
        assert client.invalidate("svc", token.access_token, "read write")
        client.get_token("svc", "read write")
    get_db, report_db, get_svc, report_svc = seen
    assert get_db.url.params == httpx.QueryParams({"account": "alice"})
    assert report_db.url.path == "/v1/tokens/db/invalidate"
    assert json.loads(report_db.content) == {"access_token": "tok1", "account": "alice"}
    assert get_svc.url.params == httpx.QueryParams({"scope": "read write"})
    assert report_svc.method == "POST"
    assert json.loads(report_svc.content) == {"access_token": "tok3", "scope": "read write"}
    for request in seen:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert KEY not in str(request.url)


def test_bad_arguments_fail_locally_without_a_request(transport: CountingTransport) -> None:
    """Malformed URLs and keys raise ValueError; malformed names raise before any request."""
    for url in ("ftp://broker", "http://user:hunter2@broker", "http://broker/?a=1", "broker"):
        with pytest.raises(ValueError, match="url") as raised:
            BrokerClient(url, api_key=KEY)
        assert "hunter2" not in str(raised.value)
    with pytest.raises(ValueError, match="api_key"):
        BrokerClient("http://broker", api_key="")
    for timing in ({"skew": -1.0}, {"refresh_ahead": 0.0}, {"refresh_ahead": 1.5}, {"timeout": 0}):
        with pytest.raises(ValueError, match="skew"):
            BrokerClient("http://broker", api_key=KEY, **timing)
    for key in ("tbk_abc\r\nX-Evil: 1", "tbk_\u00e4bc"):
        with pytest.raises(ValueError, match="api_key") as raised:
            BrokerClient("http://broker", api_key=key)
        assert key not in str(raised.value)
    with BrokerClient("http://broker", api_key=KEY, transport=transport) as client:
        for provider, scope, account in (
            ("../admin", None, None),
            ("Svc", None, None),
            ("svc", 'read"', None),
            ("svc", "x" * 2000, None),
            ("svc", None, ""),
        ):
            with pytest.raises(UnknownProviderError):
                client.get_token(provider, scope, account=account)
        with pytest.raises(UnknownProviderError):
            client.httpx_auth("svc/../x")
    assert transport.sent == []


def test_api_key_never_appears_in_reprs_errors_or_logs(
    served: Served, auth_server: AuthorizationServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The key is absent from the client's, adapters' and errors' repr/str and from every log line."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with BrokerClient(served.url, api_key=KEY) as client:
        client.get_token("svc")
        for thing in (client, client.httpx_auth("svc"), client.requests_auth("svc"), vars(client)):
            texts += [repr(thing), str(thing)]
        auth_server.inject(Fault(status=503, body=""), times=None)
        for provider in ("nope", "rt"):
            with pytest.raises(TokenBrokerError) as raised:
                client.get_token(provider)
            texts += [str(raised.value), repr(raised.value)]
    bad = new_key()
    with (
        BrokerClient(served.url, api_key=bad) as stranger,
        pytest.raises(TokenBrokerError) as raised,
    ):
        stranger.get_token("svc")
    texts += [str(raised.value), repr(raised.value), repr(stranger)]
    with (
        BrokerClient("http://127.0.0.1:1", api_key=KEY) as nobody,
        pytest.raises(TokenBrokerError) as raised,
    ):
        nobody.get_token("svc")
    texts += [str(raised.value), repr(raised.value), repr(raised.value.__cause__)]
    assert "**********" in repr(vars(client))
    assert caplog.text
    for text in [*texts, caplog.text]:
        assert KEY not in text
        assert bad not in text


def test_a_read_tokens_expiry_counts_from_the_injected_clock() -> None:
    """A token read from the broker expires ``expires_in`` seconds after the client's injected
    clock's wall time, not the system's."""

    def broker(request: httpx.Request) -> httpx.Response:
        body = {"access_token": "at", "token_type": "Bearer", "expires_in": 600, "scope": None}
        return httpx.Response(200, json=body)

    clock = ManualClock()
    transport = httpx.MockTransport(broker)
    with BrokerClient(
        "http://broker.test", api_key=KEY, clock=clock, transport=transport
    ) as client:
        response = client.fetch(client.resolve(("svc", None, None)), None)
    assert response.token.expires_at == clock.time() + 600
    assert response.token.seconds_left(clock) == 600
