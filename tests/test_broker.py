"""Broker against a real authorization server: single flight, refresh-ahead, the error table, rotation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import threading
import time
import traceback
from pathlib import Path

import pytest

from conftest import BrokerFactory
from support import client_credentials, login, refresh_token, stampede, wait_for
from tokenbroker import (
    ClientAuthenticationError,
    InvalidScopeError,
    InvalidTokenError,
    ManualClock,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    Token,
    TooManyScopesError,
    UnknownProviderError,
)
from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.events import TokenAcquired
from tokenbroker.core.secret import Secret
from tokenbroker.store import open_store
from tokenbroker.testing import AuthorizationServer, Fault, decode_client_secret_basic


def test_thousand_threads_cold_key_one_token_request(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """1000 threads on a cold key: the server sees exactly one token request, all get that token."""
    auth_server.latency = 0.2
    broker = make_broker()
    results = stampede(1000, lambda: broker.get_token("svc"))
    assert auth_server.count("client_credentials") == 1
    assert len({r.access_token for r in results}) == 1  # type: ignore[union-attr]


def test_thousand_threads_expired_key_one_token_request(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """1000 threads on an expired key: exactly one more token request."""
    clock = ManualClock()
    broker = make_broker(clock=clock)
    first = broker.get_token("svc")
    clock.advance(3600)
    auth_server.latency = 0.2
    results = stampede(1000, lambda: broker.get_token("svc"))
    assert auth_server.count("client_credentials") == 2
    tokens = {r.access_token for r in results}  # type: ignore[union-attr]
    assert len(tokens) == 1
    assert first.access_token not in tokens


def test_thousand_tasks_cold_then_expired_one_request_each(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """1000 asyncio tasks on a cold key, then on an expired key: one token request each time."""
    clock = ManualClock()
    broker = make_broker(clock=clock)
    auth_server.latency = 0.2

    async def wave() -> set[str]:
        tokens = await asyncio.gather(*(broker.aget_token("svc") for _ in range(1000)))
        return {t.access_token for t in tokens}

    cold = asyncio.run(wave())
    assert auth_server.count("client_credentials") == 1
    clock.advance(3600)
    expired = asyncio.run(wave())
    assert auth_server.count("client_credentials") == 2
    assert len(cold) == len(expired) == 1
    assert cold != expired


def test_refresh_ahead_under_load_never_makes_a_caller_wait(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """Across 5 token lifetimes with 400 ms provider latency, no warm get_token waits for the provider.

    A caller that waited for a refresh would take at least the provider's 400 ms; the bound
    of 200 ms leaves room for a loaded 2-core machine's scheduling without hiding a wait.
    """
    server = AuthorizationServer(expires_in=2)
    server.add_client("c", "s", scopes=["read"])
    with server:
        broker = make_broker(
            {"svc": {**client_credentials(server), "client_id": "c", "client_secret": "s"}},
            defaults={"skew_seconds": 0.5, "refresh_ahead": 0.5},
        )
        broker.get_token("svc")
        server.latency = 0.4
        stop_at = time.monotonic() + 10.0
        worst: list[float] = []
        expired: list[float] = []

        def caller() -> None:
            slowest = 0.0
            while time.monotonic() < stop_at:
                began = time.perf_counter()
                token = broker.get_token("svc")
                slowest = max(slowest, time.perf_counter() - began)
                if token.expires_at - time.time() <= 0:
                    expired.append(token.expires_at)
                time.sleep(0.002)
            worst.append(slowest)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        refreshes = server.count("client_credentials")
    assert max(worst) < 0.200, f"slowest get_token took {max(worst) * 1000:.1f} ms"
    assert not expired
    assert 5 <= refreshes <= 15


REFRESH_CONCURRENCY = 8  # the default of defaults.refresh_concurrency


def _broker_threads(ignore: set[threading.Thread]) -> int:
    """Threads alive in this process, less ``ignore`` and the authorization server's
    connection threads (socketserver names them after their target)."""
    return sum(
        1
        for t in threading.enumerate()
        if t not in ignore and "process_request_thread" not in t.name
    )


def test_two_hundred_due_keys_refresh_through_a_bounded_executor(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """200 due keys: at most 8 token requests in flight and 8 more threads at any time, yet
    every key refreshes, and each keeps serving its current token meanwhile."""
    accounts = [{"username": f"user{i}", "password": f"pw{i}"} for i in range(200)]
    for account in accounts:
        auth_server.add_account(account["username"], account["password"])
    clock = ManualClock()
    broker = make_broker({"db": login(auth_server, credentials=accounts)}, clock=clock)
    names = [a["username"] for a in accounts]
    first = {name: broker.get_token("db", account=name).access_token for name in names}
    assert auth_server.count("login") == 200
    auth_server.reset_counts()
    auth_server.latency = 0.05
    clock.advance(3000)  # past 80% of the 3600 s lifetime, before the skew window
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _broker_threads(ignore))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    ignore = {threading.current_thread(), watcher}
    baseline = _broker_threads(ignore)
    peak = [baseline]
    watcher.start()
    try:
        assert broker.refresh_due() == 200
        began = time.perf_counter()
        served = [broker.get_token("db", account=name).access_token for name in names]
        waited = time.perf_counter() - began
        deadline = time.monotonic() + 30
        while auth_server.count("login") < 200 or auth_server.in_flight:
            assert time.monotonic() < deadline, "the refreshes did not finish in time"
            time.sleep(0.01)
    finally:
        done.set()
        watcher.join(10)
    assert auth_server.max_in_flight <= REFRESH_CONCURRENCY, auth_server.max_in_flight
    assert peak[0] - baseline <= REFRESH_CONCURRENCY, peak[0] - baseline
    assert auth_server.count("login") == 200
    assert waited < 1.0  # 200 cache hits, none waiting for its queued refresh
    assert all(
        s == first[n] or s in auth_server.issued_login_tokens
        for n, s in zip(names, served, strict=True)
    )
    for _ in range(1000):  # the last replies may still be settling in the cache
        fresh = [broker.peek_token("db", account=name) for name in names]
        if all(token is not None for token in fresh):
            break
        time.sleep(0.01)
    assert all(
        t is not None and t.access_token != first[n] for n, t in zip(names, fresh, strict=True)
    )
    assert auth_server.count("login") == 200


def test_refresh_due_fetches_required_providers_and_retries_them(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """refresh_due() fetches a required provider nobody asked for, retries it after a failure's
    backoff (not before), and readiness follows only its configured scopes."""
    clock = ManualClock()
    broker = make_broker(
        {
            "svc": client_credentials(auth_server, required=True),
            "other": client_credentials(auth_server),
        },
        defaults={"retries": 0},
        clock=clock,
    )
    assert broker.required() == ["svc"]
    assert broker.unready() == ["svc"]
    auth_server.inject(Fault(status=500, body=""))
    assert broker.refresh_due() == 1
    wait_for(lambda: broker.provider_states()["svc"] == "failed")
    assert broker.unready() == ["svc"]
    assert broker.refresh_due() == 0  # backing off
    clock.advance(2)
    assert broker.refresh_due() == 1
    wait_for(lambda: not broker.unready())
    assert broker.provider_states() == {"svc": "valid", "other": "empty"}
    with pytest.raises(ProviderMisconfiguredError):
        broker.get_token("svc", scope="admin")  # the server refuses that scope
    assert broker.unready() == []
    assert broker.provider_states()["svc"] == "valid"
    assert broker.refresh_due() == 0
    assert auth_server.count("client_credentials") == 3


def test_compare_and_invalidate_fifty_callers_one_refresh(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """50 consumers reporting the same rejected token cause exactly one new token request."""
    broker = make_broker()
    rejected = broker.get_token("svc").access_token
    auth_server.latency = 0.1

    def report() -> str:
        broker.invalidate("svc", rejected)
        return broker.get_token("svc").access_token

    results = stampede(50, report)
    assert auth_server.count("client_credentials") == 2
    assert len(set(results)) == 1
    assert rejected not in results


# -- the error table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "requests"),
    [
        (Fault(status=401, body='{"error":"invalid_client"}'), ClientAuthenticationError, 1),
        (Fault(status=403, body='{"error":"access_denied"}'), ClientAuthenticationError, 1),
        (Fault(status=400, body='{"error":"invalid_client"}'), ClientAuthenticationError, 1),
        (Fault(status=400, body='{"error":"invalid_scope"}'), ProviderMisconfiguredError, 1),
        (Fault(status=404, body="not here"), ProviderMisconfiguredError, 1),
        (Fault(status=500, body="oops"), ProviderUnavailableError, 3),
        (Fault(status=502, body=""), ProviderUnavailableError, 3),
        (Fault(status=200, body="not json"), ProviderUnavailableError, 3),
        (Fault(status=200, body='{"token_type":"bearer"}'), ProviderUnavailableError, 3),
        (Fault(status=200, body='{"access_token":"a\\r\\nb"}'), InvalidTokenError, 3),
        (Fault(drop=True), ProviderUnavailableError, 3),
    ],
)
def test_error_table(
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    fault: Fault,
    error: type[Exception],
    requests: int,
) -> None:
    """Each provider reply maps to its error class, retried only when retryable (retries=2)."""
    auth_server.inject(fault, times=None)
    broker = make_broker()
    with pytest.raises(error) as caught:
        broker.get_token("svc")
    assert auth_server.count("client_credentials") == requests
    assert type(caught.value) is error


def test_wrong_client_secret_is_client_authentication_error(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """The real server rejecting our secret gives ClientAuthenticationError after one request."""
    broker = make_broker({"svc": client_credentials(auth_server, client_secret="wrong")})
    with pytest.raises(ClientAuthenticationError):
        broker.get_token("svc")
    assert auth_server.count("client_credentials") == 1


def test_transient_failures_then_success(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """Two 503s then a good reply: the caller gets a token after three requests."""
    auth_server.inject(Fault(status=503, body="busy"), times=2)
    token = make_broker().get_token("svc")
    assert token.access_token in auth_server.issued_access_tokens
    assert auth_server.count("client_credentials") == 3


@pytest.mark.parametrize("as_date", [False, True])
def test_retry_after_is_honoured(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, as_date: bool
) -> None:
    """A 429 with Retry-After (seconds or HTTP-date) delays the next attempt by at least that."""
    from email.utils import formatdate

    value = formatdate(time.time() + 2, usegmt=True) if as_date else "1"
    auth_server.inject(Fault(status=429, body="slow down", headers={"Retry-After": value}))
    began = time.monotonic()
    make_broker().get_token("svc")
    assert time.monotonic() - began >= 0.9
    assert auth_server.count("client_credentials") == 2


def test_retry_after_beyond_deadline_fails_fast(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """A Retry-After longer than the deadline fails at once, carrying the delay, without waiting."""
    auth_server.inject(Fault(status=503, body="", headers={"Retry-After": "120"}))
    broker = make_broker(defaults={"deadline_seconds": 5})
    began = time.monotonic()
    with pytest.raises(ProviderUnavailableError) as caught:
        broker.get_token("svc")
    assert time.monotonic() - began < 2
    assert caught.value.retry_after == 120
    assert auth_server.count("client_credentials") == 1


def test_timeouts_are_retried_within_the_deadline(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """A provider slower than timeout_seconds is retried, and the whole call ends near the deadline."""
    auth_server.inject(Fault(delay=3.0), times=None)
    broker = make_broker(defaults={"timeout_seconds": 0.3, "deadline_seconds": 1.5})
    began = time.monotonic()
    with pytest.raises(ProviderUnavailableError):
        broker.get_token("svc")
    assert time.monotonic() - began < 2.0
    assert auth_server.count("client_credentials") == 3


def test_async_caller_stalled_reply_abandoned_and_retried_within_bounds(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """An async caller's stalled token reply is abandoned at the attempt timeout and retried once."""
    auth_server.inject(Fault(delay=2.0), times=2)
    broker = make_broker(defaults={"timeout_seconds": 0.2, "retries": 1, "deadline_seconds": 5.0})
    began = time.monotonic()
    with pytest.raises(ProviderUnavailableError, match="timed out"):
        asyncio.run(broker.aget_token("svc"))
    elapsed = time.monotonic() - began
    assert auth_server.count("client_credentials") == 2
    assert 0.4 <= elapsed < 1.8


def test_connection_refused_is_unavailable_and_not_sent(make_broker: BrokerFactory) -> None:
    """Nothing listening: ProviderUnavailableError marked as never sent, naming the URL it tried
    without its query (which may carry a secret)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/token?api_key=CANARY_QUERY"
    broker = make_broker(
        {
            "svc": {
                "grant": "client_credentials",
                "token_url": url,
                "client_id": "a",
                "client_secret": "b",
            }
        }
    )
    with pytest.raises(ProviderUnavailableError) as caught:
        broker.get_token("svc")
    assert caught.value.sent is False
    assert f"http://127.0.0.1:{port}/token" in str(caught.value)
    assert "CANARY_QUERY" not in str(caught.value)


def test_unknown_provider_account_and_scope(
    make_broker: BrokerFactory, auth_server: AuthorizationServer
) -> None:
    """Unknown providers, accounts and unserviceable scopes raise UnknownProviderError, no request."""
    seed = auth_server.issue_refresh_token("rt-client", scope="read")
    broker = make_broker(
        {
            "svc": client_credentials(auth_server),
            "rt": refresh_token(auth_server, seed, scopes=["read"]),
            "db": login(auth_server),
        }
    )
    for call in (
        lambda: broker.get_token("nope"),
        lambda: broker.get_token("db", account="mallory"),
        lambda: broker.get_token("svc", account="alice"),
        lambda: broker.get_token("rt", scope="admin"),
        lambda: broker.get_token("svc", scope="bad\nscope"),
    ):
        with pytest.raises(UnknownProviderError):
            call()
    assert auth_server.count("client_credentials") == auth_server.count("refresh_token") == 0


# -- grants end to end ----------------------------------------------------------------------


def test_scopes_are_normalised_to_one_cache_entry(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """'read write', 'write read' and ['read','write'] share one token; 'read' alone is another."""
    broker = make_broker()
    a = broker.get_token("svc", "read write")
    b = broker.get_token("svc", "write  read")
    c = broker.get_token("svc", ["write", "read"])  # type: ignore[arg-type]
    d = broker.get_token("svc")
    assert a.access_token == b.access_token == c.access_token
    assert d.access_token != a.access_token
    assert auth_server.count("client_credentials") == 2


def test_blank_scope_spellings_mean_the_configured_scopes(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """None, "", blanks and empty lists all mean the configured ``read``: one token, asked for
    with ``scope=read`` (never with no scope, which this server answers with every scope)."""
    broker = make_broker()
    tokens = {
        broker.get_token("svc", spelling).access_token  # type: ignore[arg-type]
        for spelling in (None, "", " ", "   ", [], (), "read", " read  read ", ["read"])
    }
    assert len(tokens) == 1
    assert auth_server.count("client_credentials") == 1
    (request,) = [r for r in auth_server.requests if r.grant == "client_credentials"]
    assert request.form["scope"] == "read"
    assert broker.get_token("svc", "").scope == "read"


def test_malformed_scopes_are_refused_without_a_request(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """Tabs, newlines, non-ASCII, list items that are not one scope-token, non-strings and
    over-long scopes raise InvalidScopeError (an UnknownProviderError); nothing is sent."""
    broker = make_broker()
    for spelling in (
        "\t",
        "\n",
        "read\twrite",
        "read\nwrite",
        "read\r\nwrite",
        "read\x00",
        "read\u00a0write",
        "r\u00e9ad",
        'read"',
        "read\\",
        ["read write"],
        [""],
        [" "],
        ["read", 1],
        [b"read"],
        b"read",
        7,
        "read " * 300,
    ):
        with pytest.raises(InvalidScopeError):
            broker.get_token("svc", spelling)  # type: ignore[arg-type]
        with pytest.raises(InvalidScopeError):
            broker.invalidate("svc", "some-token", spelling)  # type: ignore[arg-type]
    assert auth_server.requests == []
    assert broker.store.states() == []


def test_distinct_scope_sets_are_bounded_per_provider(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """1000 bogus scopes: at most max_scopes (default 16, the configured set included) token
    requests and stored rows; the rest raise TooManyScopesError before any request."""
    broker = make_broker()
    broker.get_token("svc")
    errors = []
    for i in range(1000):
        with pytest.raises(UnknownProviderError if i >= 15 else ProviderMisconfiguredError) as e:
            broker.get_token("svc", f"bogus{i}")
        errors.append(type(e.value))
    assert auth_server.count("client_credentials") == 16
    assert len(broker.store.states()) <= 16
    assert errors[15:] == [TooManyScopesError] * 985
    assert broker.get_token("svc", "read").access_token == broker.get_token("svc").access_token
    assert auth_server.count("client_credentials") == 16


def test_max_scopes_is_configurable(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """``max_scopes: 2`` on a provider admits the configured set and one more."""
    broker = make_broker({"svc": client_credentials(auth_server, max_scopes=2)})
    broker.get_token("svc", "read write")
    with pytest.raises(TooManyScopesError):
        broker.get_token("svc", "write")
    broker.get_token("svc")
    assert auth_server.count("client_credentials") == 2


def test_invalidate_cooldown_bounds_forced_fetches(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """Invalidating each successive current token ten times within the cooldown (default 5 s)
    forces one new token request; after the cooldown the next invalidation works again."""
    clock = ManualClock()
    broker = make_broker(clock=clock)
    current = broker.get_token("svc").access_token
    dropped = []
    for _ in range(10):
        dropped.append(broker.invalidate("svc", current))
        current = broker.get_token("svc").access_token
        clock.advance(0.4)
    assert dropped == [True] + [False] * 9
    assert auth_server.count("client_credentials") == 2
    clock.advance(1.0)
    assert broker.invalidate("svc", current)
    assert broker.get_token("svc").access_token != current
    assert auth_server.count("client_credentials") == 3


def test_invalidate_cooldown_is_configurable_per_provider(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """``invalidate_cooldown_seconds: 0`` on a provider turns the cooldown off for it alone."""
    broker = make_broker(
        {
            "svc": client_credentials(auth_server, invalidate_cooldown_seconds=0),
            "db": login(auth_server),
        },
        defaults={"invalidate_cooldown_seconds": 60},
        clock=ManualClock(),
    )
    for provider in ("svc", "db"):
        for _ in range(3):
            broker.invalidate(provider, broker.get_token(provider).access_token)
            broker.get_token(provider)
    assert auth_server.count("client_credentials") == 4
    assert auth_server.count("login") == 2


def test_rotating_refresh_token_is_replaced_and_never_reused(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """Each refresh presents the newest refresh token; the server sees no reuse across 5 expiries."""
    seed = auth_server.issue_refresh_token("rt-client")
    clock = ManualClock()
    broker = make_broker({"rt": refresh_token(auth_server, seed)}, clock=clock)
    for _ in range(5):
        results = stampede(50, lambda: broker.get_token("rt"))
        assert all(isinstance(r, Token) for r in results)
        clock.advance(3600)
    presented = auth_server.presented_refresh_tokens
    assert len(presented) == 5
    assert presented[0] == seed
    assert len(set(presented)) == 5
    assert not auth_server.reused_refresh_tokens()


def test_non_rotating_reply_keeps_the_old_refresh_token(make_broker: BrokerFactory) -> None:
    """When the reply carries no refresh_token, the same one is used next time."""
    server = AuthorizationServer(rotation="non_rotating")
    server.add_client("rt-client", None, auth_method="none")
    with server:
        seed = server.issue_refresh_token("rt-client")
        clock = ManualClock()
        broker = make_broker({"rt": refresh_token(server, seed)}, clock=clock)
        broker.get_token("rt")
        clock.advance(3600)
        broker.get_token("rt")
        assert server.presented_refresh_tokens == [seed, seed]


@pytest.mark.parametrize("reuse_error", ["invalid_grant", "login_required"])
def test_dead_refresh_token_requires_reauthorization_and_stops_calls(
    make_broker: BrokerFactory, reuse_error: str
) -> None:
    """invalid_grant / Tesla's 401 login_required: reauthorization required, one request, then none."""
    server = AuthorizationServer(reuse_error=reuse_error)
    server.add_client("rt-client", None, auth_method="none")
    with server:
        seed = server.issue_refresh_token("rt-client")
        server.issue_refresh_token("rt-client")
        clock = ManualClock()
        broker = make_broker({"rt": refresh_token(server, seed)}, clock=clock)
        broker.get_token("rt")
        # Someone else uses the seed too: the provider revokes the family.
        broker2 = make_broker({"rt": refresh_token(server, seed)})
        with pytest.raises(ReauthorizationRequiredError):
            broker2.get_token("rt")
        clock.advance(3600)
        with pytest.raises(ReauthorizationRequiredError):
            broker.get_token("rt")
        calls = server.count("refresh_token")
        clock.advance(86400)
        with pytest.raises(ReauthorizationRequiredError):
            broker.get_token("rt")
        assert server.count("refresh_token") == calls == 3
        assert [s.state for s in broker.states()] == ["reauthorization_required"]


def test_a_remembered_error_does_not_grow_with_each_call(make_broker: BrokerFactory) -> None:
    """A dead credential's remembered error is raised to every later caller without piling
    each raise's frames onto one traceback (which would grow, and keep frames alive, forever)."""
    server = AuthorizationServer()
    server.add_client("rt-client", None, auth_method="none")
    with server:
        broker = make_broker({"rt": refresh_token(server, "never-issued")})
        depths = []
        for _ in range(50):
            with pytest.raises(ReauthorizationRequiredError) as caught:
                broker.get_token("rt")
            depths.append(len(traceback.extract_tb(caught.value.__traceback__)))
        assert server.count("refresh_token") == 1
    assert depths[-1] == depths[1], depths


def test_login_accounts_get_their_own_tokens(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """Each login account is logged in once and gets its own token; the first is the default."""
    broker = make_broker({"db": login(auth_server)})
    alice = broker.get_token("db", account="alice")
    bob = broker.get_token("db", account="bob")
    assert broker.get_token("db").access_token == alice.access_token
    assert alice.access_token != bob.access_token
    assert auth_server.count("login") == 2
    assert broker.accounts("db") == ["alice", "bob"]


def test_login_with_wrong_password_is_client_authentication_error(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """A rejected login is a ClientAuthenticationError after one attempt."""
    provider = login(auth_server, credentials=[{"username": "alice", "password": "nope"}])
    with pytest.raises(ClientAuthenticationError):
        make_broker({"db": provider}).get_token("db")
    assert auth_server.count("login") == 1


def test_private_key_jwt_uses_fresh_jti_on_retry(make_broker: BrokerFactory) -> None:
    """private_key_jwt authenticates; after a 503 the retry carries a new jti the server accepts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    server = AuthorizationServer()
    server.add_client("jwt-client", None, auth_method="private_key_jwt", public_key=public)
    with server:
        server.inject(Fault(status=503, body=""))
        provider = {
            "grant": "client_credentials",
            "token_url": server.token_url,
            "client_id": "jwt-client",
            "client_auth": "private_key_jwt",
            "private_key": pem,
        }
        token = make_broker({"jwt": provider}).get_token("jwt")
        assertions = [r.form.get("client_assertion") for r in server.requests]
    assert token.access_token
    assert len(assertions) == 2
    assert assertions[0] != assertions[1]


def test_basic_auth_with_special_characters(make_broker: BrokerFactory) -> None:
    """Client ids and secrets with ':', '%', '+', spaces and 'é' authenticate via Basic (RFC 6749 §2.3.1)."""
    server = AuthorizationServer()
    server.add_client("id:with%+ é", "sec:ret%+ é", scopes=["read"])
    with server:
        provider = {
            "grant": "client_credentials",
            "token_url": server.token_url,
            "client_id": "id:with%+ é",
            "client_secret": "sec:ret%+ é",
        }
        assert make_broker({"svc": provider}).get_token("svc").access_token


def test_async_errors_match_sync(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """The async driver classifies and retries like the sync one (500 ×3 → unavailable, 3 requests)."""
    auth_server.inject(Fault(status=500, body=""), times=None)
    broker = make_broker()
    with pytest.raises(ProviderUnavailableError):
        asyncio.run(broker.aget_token("svc"))
    assert auth_server.count("client_credentials") == 3


def test_aclose_waits_for_async_background_refresh(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """An async refresh-ahead runs in a background task that `async with broker` waits for."""
    clock = ManualClock()
    broker = make_broker(clock=clock)

    async def main() -> tuple[str, str]:
        async with broker:
            first = (await broker.aget_token("svc")).access_token
            clock.advance(3000)  # past 80% of 3600 s, before the skew window
            served = (await broker.aget_token("svc")).access_token
        return first, served

    first, served = asyncio.run(main())
    assert first == served
    assert auth_server.count("client_credentials") == 2


def test_strict_single_use_refresh_token_is_presented_at_most_twice(
    make_broker: BrokerFactory,
) -> None:
    """Replies that may have rotated a strict single-use token (500s) allow one resend, then the
    credential is marked reauthorization_required and the provider hears nothing more."""
    server = AuthorizationServer()
    server.add_client("rt-client", None, auth_method="none")
    with server:
        seed = server.issue_refresh_token("rt-client")
        server.inject(Fault(status=500, body=""), times=None)
        clock = ManualClock()
        broker = make_broker(
            {"rt": refresh_token(server, seed)}, defaults={"retries": 5}, clock=clock
        )
        with pytest.raises(ReauthorizationRequiredError):
            broker.get_token("rt")
        clock.advance(3600)
        with pytest.raises(ReauthorizationRequiredError):
            broker.get_token("rt")
        assert server.presented_refresh_tokens == [seed, seed]
        assert broker.store.load("rt").state == "reauthorization_required"


def test_not_processed_replies_do_not_count_as_resends(make_broker: BrokerFactory) -> None:
    """429 and 503 + Retry-After mean 'not processed': retried up to `retries`, then success."""
    server = AuthorizationServer()
    server.add_client("rt-client", None, auth_method="none")
    with server:
        seed = server.issue_refresh_token("rt-client")
        server.inject(Fault(status=429, body="", headers={"Retry-After": "0"}), times=2)
        server.inject(Fault(status=503, body="", headers={"Retry-After": "0"}), times=1)
        broker = make_broker({"rt": refresh_token(server, seed)}, defaults={"retries": 3})
        assert broker.get_token("rt").access_token
        assert server.count("refresh_token") == 4


def test_confidential_refresh_client_without_client_auth_sends_basic(
    make_broker: BrokerFactory,
) -> None:
    """A refresh_token provider with client_secret and no client_auth authenticates with
    client_secret_basic: a confidential client's refresh works, and the server saw Basic auth."""
    server = AuthorizationServer()
    server.add_client("rt-conf", "rt-conf-secret", auth_method="client_secret_basic")
    with server:
        seed = server.issue_refresh_token("rt-conf")
        provider = refresh_token(server, seed, client_id="rt-conf", client_secret="rt-conf-secret")
        assert make_broker({"rt": provider}).get_token("rt").access_token
        headers = [r.headers.get("Authorization") for r in server.requests]
    assert [decode_client_secret_basic(h) for h in headers] == [("rt-conf", "rt-conf-secret")]
    assert server.count("refresh_token") == 1


def test_a_token_read_from_the_store_reports_its_read_time_not_its_age(
    tmp_path: Path,
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token another process stored 50 minutes ago is acquired with duration_ms (log line
    and TokenAcquired.duration) of the read itself, not the token's age."""
    keyring = Keyring([Secret(generate_key())])
    url = f"sqlite:///{tmp_path / 'tb.db'}"
    stores = [open_store(url, keyring) for _ in range(2)]
    try:
        make_broker(store=stores[0]).get_token("svc")
        with contextlib.closing(sqlite3.connect(tmp_path / "tb.db")) as db, db:
            db.execute(
                "UPDATE tb_credential SET at_obtained_at = at_obtained_at - 3000,"
                " at_expires_at = at_expires_at - 3000"
            )
        second = make_broker(store=stores[1])
        events: list[object] = []
        second.subscribe(events.append)
        started = time.monotonic()
        with caplog.at_level(logging.INFO, "tokenbroker.cache"):
            second.get_token("svc")
        took = time.monotonic() - started
    finally:
        for store in stores:
            store.close()
    assert auth_server.count("client_credentials") == 1  # the second broker read the store
    (acquired,) = [e for e in events if isinstance(e, TokenAcquired)]
    assert 0 <= acquired.duration <= took
    (line,) = [r.getMessage() for r in caplog.records if "token acquired" in r.getMessage()]
    assert 0 <= float(line.rpartition("duration_ms=")[2]) <= took * 1000, line
