"""TokenPool: one account per client connection, FIFO waiters, re-login on rejection, reaping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import POOL_ACCOUNTS, BrokerFactory
from support import login
from tokenbroker import Broker, ClientAuthenticationError, ManualClock, ProviderUnavailableError
from tokenbroker.config import ProxyRoute
from tokenbroker.core.events import Event
from tokenbroker.proxy.pool import (
    CredentialState,
    LeaseExpiredError,
    LeaseGranted,
    LeaseState,
    PoolExhaustedError,
    PoolLease,
    TokenPool,
)
from tokenbroker.testing import AuthorizationServer

ACCOUNTS = POOL_ACCOUNTS


@pytest.fixture
def broker(pool_broker: Broker) -> Broker:
    """A broker with a login provider ``db`` over the accounts alice, bob and carol."""
    return pool_broker


@pytest.fixture
def make_pool(broker: Broker) -> Iterator[Callable[..., TokenPool]]:
    """Build pools over ``broker``'s provider ``db``; they are closed after the test."""
    pools: list[TokenPool] = []

    def factory(**kwargs: Any) -> TokenPool:
        pool = TokenPool(broker, "db", **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.close()


async def _hold_all(pool: TokenPool) -> list[PoolLease]:
    return [await pool.acquire(f"holder-{i}") for i in range(pool.stats().total)]


def test_concurrent_connections_never_share_a_credential(
    make_pool: Callable[..., TokenPool], auth_server: AuthorizationServer
) -> None:
    """10 connections x 20 requests on 3 accounts: exclusive, sticky, FIFO, 3 logins, all returned."""
    pool = make_pool()
    held: set[str] = set()
    granted: list[int] = []
    seen: dict[int, set[str]] = {}
    shared: list[str] = []

    async def connection(i: int) -> None:
        lease = await pool.acquire(f"client-{i}")
        account = lease.account
        assert account is not None
        if account in held:
            shared.append(account)
        held.add(account)
        granted.append(i)
        seen[i] = set()
        for _ in range(20):
            with lease.request():
                token = await lease.token()
                assert token.access_token
                seen[i].add(str(lease.account))
                await asyncio.sleep(0)
        held.discard(account)
        lease.close()
        assert lease.state is LeaseState.RELEASED

    async def main() -> None:
        tasks = [asyncio.create_task(connection(i)) for i in range(10)]
        await asyncio.sleep(0)
        assert pool.stats().waiting == 7
        await asyncio.gather(*tasks)

    asyncio.run(main())
    stats = pool.stats()
    assert shared == []
    assert all(len(accounts) == 1 for accounts in seen.values())
    assert granted == list(range(10))
    assert auth_server.count("login") == 3
    assert sum(c.uses for c in stats.credentials) == 200
    assert (stats.total, stats.available, stats.in_use, stats.waiting) == (3, 3, 0, 0)


def test_cancelled_waiter_leaves_the_queue_without_a_credential(
    make_pool: Callable[..., TokenPool],
) -> None:
    """A waiter cancelled in the queue takes nothing; the next waiter gets the freed account."""
    pool = make_pool()

    async def main() -> None:
        leases = await _hold_all(pool)
        gone = asyncio.create_task(pool.acquire("gone"))
        await asyncio.sleep(0)
        late = asyncio.create_task(pool.acquire("late"))
        await asyncio.sleep(0)
        assert pool.stats().waiting == 2
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert pool.stats().waiting == 1
        leases[0].close()
        lease = await late
        assert lease.account == "alice"
        lease.close()
        for other in leases[1:]:
            other.close()

    asyncio.run(main())
    stats = pool.stats()
    assert (stats.available, stats.in_use, stats.waiting) == (3, 0, 0)


def test_waiter_cancelled_after_handoff_returns_the_credential(
    make_pool: Callable[..., TokenPool],
) -> None:
    """A waiter cancelled after being handed an account (before it ran) gives the account back."""
    pool = make_pool()

    async def main() -> None:
        leases = await _hold_all(pool)
        waiter = asyncio.create_task(pool.acquire("gone"))
        await asyncio.sleep(0)
        leases[1].close()
        assert pool.stats().in_use == 3
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        stats = pool.stats()
        assert (stats.in_use, stats.available, stats.waiting) == (2, 1, 0)
        for lease in leases:
            lease.close()

    asyncio.run(main())
    assert pool.stats().available == 3


def test_wait_timeout_raises_pool_exhausted_with_retry_after(
    make_pool: Callable[..., TokenPool],
) -> None:
    """With every account held, acquire gives up after wait_timeout with a 503-class error."""
    pool = make_pool(wait_timeout=0.05, retry_after=7)

    async def main() -> PoolExhaustedError:
        leases = await _hold_all(pool)
        with pytest.raises(PoolExhaustedError) as caught:
            await pool.acquire("late")
        assert pool.stats().waiting == 0
        for lease in leases:
            lease.close()
        return caught.value

    error = asyncio.run(main())
    assert isinstance(error, ProviderUnavailableError)
    assert error.retry_after == 7
    assert pool.stats().available == 3


def test_rejected_token_relogs_that_credential_once(
    make_pool: Callable[..., TokenPool], auth_server: AuthorizationServer
) -> None:
    """Two reports of one rejected token cause one re-login of that account only."""
    pool = make_pool()

    async def main() -> tuple[str, str, str]:
        assert await pool.warm() == {}
        lease = await pool.acquire("client")
        account = str(lease.account)
        old = (await lease.token()).access_token
        assert lease.report_rejected(old) is True
        assert lease.report_rejected(old) is False
        new = (await lease.token()).access_token
        lease.close()
        return account, old, new

    account, old, new = asyncio.run(main())
    assert old != new
    assert auth_server.count("login") == 4
    counts = {c.account: (c.errors, c.refreshes) for c in pool.stats().credentials}
    expected = {name: (0, 1) for name, _ in ACCOUNTS} | {account: (2, 2)}
    assert counts == expected


def test_token_is_read_afresh_on_each_request(
    make_pool: Callable[..., TokenPool], broker: Broker, auth_server: AuthorizationServer
) -> None:
    """A token replaced outside the lease (a background refresh) is used by the next request."""
    pool = make_pool()

    async def main() -> tuple[str, str]:
        lease = await pool.acquire("client")
        old = (await lease.token()).access_token
        assert broker.invalidate("db", old, account=lease.account)
        new = (await lease.token()).access_token
        lease.close()
        return old, new

    old, new = asyncio.run(main())
    assert old != new
    assert auth_server.count("login") == 2


def test_warm_logs_in_every_account_once_and_reports_progress(
    make_pool: Callable[..., TokenPool], auth_server: AuthorizationServer
) -> None:
    """warm() logs in each account once, calls progress per account; a second warm is free."""
    pool = make_pool()
    progress: list[tuple[int, int]] = []
    assert (
        asyncio.run(pool.warm(concurrency=2, progress=lambda d, t: progress.append((d, t)))) == {}
    )
    assert asyncio.run(pool.warm()) == {}
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert auth_server.count("login") == 3
    assert pool.stats().available == 3


def test_warm_marks_an_account_with_a_bad_password_failed(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """An account whose login is refused becomes FAILED and is never leased."""
    credentials = [
        {"username": "alice", "password": "nope"},
        {"username": "bob", "password": "bob-pw"},
    ]
    pool = TokenPool(make_broker({"db": login(auth_server, credentials=credentials)}), "db")

    async def main() -> list[str | None]:
        failures = await pool.warm()
        assert list(failures) == ["alice"]
        lease = await pool.acquire("client")
        accounts = [lease.account]
        lease.close()
        lease = await pool.acquire("client")
        accounts.append(lease.account)
        lease.close()
        return accounts

    assert asyncio.run(main()) == ["bob", "bob"]
    states = {c.account: (c.state, c.errors) for c in pool.stats().credentials}
    assert states == {"alice": (CredentialState.FAILED, 1), "bob": (CredentialState.AVAILABLE, 0)}
    pool.close()


def test_closed_connection_keeps_its_credential_until_the_request_ends(
    make_pool: Callable[..., TokenPool],
) -> None:
    """close() during a request leaves the lease CLOSING; the account returns at end()."""
    pool = make_pool()

    async def main() -> None:
        lease = await pool.acquire("client")
        lease.begin()
        lease.close()
        assert lease.state is LeaseState.CLOSING
        assert pool.stats().in_use == 1
        assert (await lease.token()).access_token
        lease.end()
        assert lease.state is LeaseState.RELEASED
        lease.close()

    asyncio.run(main())
    assert pool.stats().available == 3


def test_reap_frees_an_idle_lease_but_not_one_in_flight(
    make_pool: Callable[..., TokenPool],
) -> None:
    """reap() expires a lease idle past idle_timeout, skips one mid-request, and the freed account serves a waiter."""
    clock = ManualClock()
    pool = make_pool(idle_timeout=30, clock=clock)

    async def main() -> None:
        idle, busy, other = await _hold_all(pool)
        waiter = asyncio.create_task(pool.acquire("waiter"))
        await asyncio.sleep(0)
        busy.begin()
        clock.advance(20)
        with other.request():
            assert pool.reap() == 0
        clock.advance(11)
        assert pool.reap() == 1
        assert idle.state is LeaseState.EXPIRED
        served = await waiter
        assert served.account == "alice"
        with pytest.raises(LeaseExpiredError):
            idle.begin()
        with pytest.raises(LeaseExpiredError):
            await idle.token()
        idle.close()
        busy.end()
        for lease in (busy, other, served):
            lease.close()

    asyncio.run(main())
    assert pool.stats().available == 3


def test_a_default_pool_route_reaps_a_lease_idle_for_30_seconds(broker: Broker) -> None:
    """A pool built with a pool route's default limits (none configured) expires a lease
    idle for 30 s, not before, and hands its account to the waiter queued behind it."""
    route = ProxyRoute(prefix="/", upstream="http://127.0.0.1:9", provider="db")
    clock = ManualClock()
    pool = TokenPool(
        broker,
        "db",
        wait_timeout=route.wait_timeout_seconds,
        idle_timeout=route.idle_timeout_seconds,
        max_lease_age=route.max_lease_seconds,
        clock=clock,
    )

    async def main() -> None:
        idle, *others = await _hold_all(pool)
        account = idle.account
        waiter = asyncio.create_task(pool.acquire("waiter"))
        await asyncio.sleep(0)
        for lease in others:
            lease.begin()
        clock.advance(29.9)
        assert pool.reap() == 0
        clock.advance(0.1)
        assert pool.reap() == 1
        assert idle.state is LeaseState.EXPIRED
        assert (await waiter).account == account
        assert pool.stats().waiting == 0

    try:
        asyncio.run(main())
    finally:
        pool.close()
    assert pool.stats().in_use == 3


def test_reap_expires_a_lease_past_max_age(make_pool: Callable[..., TokenPool]) -> None:
    """A busy-but-idle-now lease older than max_lease_age is expired by reap()."""
    clock = ManualClock()
    pool = make_pool(max_lease_age=60, clock=clock)

    async def main() -> PoolLease:
        lease = await pool.acquire("client")
        for _ in range(7):
            clock.advance(10)
            with lease.request():
                await lease.token()
        return lease

    lease = asyncio.run(main())
    assert pool.reap() == 1
    assert lease.state is LeaseState.EXPIRED
    assert pool.stats().available == 3


def test_lease_wait_is_reported_and_nothing_shows_a_token(
    make_pool: Callable[..., TokenPool], auth_server: AuthorizationServer
) -> None:
    """LeaseGranted events carry the wait per account; reprs and stats show states, never a token."""
    clock = ManualClock()
    pool = make_pool(clock=clock)
    events: list[Event] = []
    pool.subscribe(events.append)

    async def main() -> str:
        leases = await _hold_all(pool)
        waiter = asyncio.create_task(pool.acquire("waiter"))
        await asyncio.sleep(0)
        text = repr(pool) + repr(leases[0]) + repr(pool.stats())
        clock.advance(2.5)
        leases[2].close()
        lease = await waiter
        await lease.token()
        text += repr(lease) + repr(pool.stats())
        for held in (*leases[:2], lease):
            held.close()
        return text

    text = asyncio.run(main())
    granted = [(e.key, e.wait) for e in events if isinstance(e, LeaseGranted)]
    assert granted[-1] == ("account=carol", 2.5)
    assert [wait for _, wait in granted[:3]] == [0.0, 0.0, 0.0]
    assert "[ACTIVE]" in text and "waiting=1" in text
    assert not any(token in text for token in auth_server.issued_login_tokens)


def test_closed_pool_turns_waiters_away(make_pool: Callable[..., TokenPool]) -> None:
    """close() fails queued and later acquirers with PoolExhaustedError."""
    pool = make_pool()

    async def main() -> None:
        await _hold_all(pool)
        waiter = asyncio.create_task(pool.acquire("waiter"))
        await asyncio.sleep(0)
        pool.close()
        with pytest.raises(PoolExhaustedError):
            await waiter
        with pytest.raises(PoolExhaustedError):
            await pool.acquire("late")

    asyncio.run(main())
    assert "[CLOSED]" in repr(pool)


def test_failed_login_on_a_lease_is_counted_and_fails_the_account_on_release(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """A refused lazy login raises to the caller, counts an error, and the account returns FAILED."""
    credentials = [{"username": "alice", "password": "nope"}]
    pool = TokenPool(make_broker({"db": login(auth_server, credentials=credentials)}), "db")

    async def main() -> None:
        lease = await pool.acquire("client")
        with lease.request(), pytest.raises(ClientAuthenticationError):
            await lease.token()
        assert lease.in_flight == 0
        lease.close()

    asyncio.run(main())
    (alice,) = pool.stats().credentials
    assert (alice.state, alice.errors, alice.uses) == (CredentialState.FAILED, 1, 1)
    assert auth_server.count("login") == 1
    pool.close()


def test_misuse_is_refused(
    make_pool: Callable[..., TokenPool],
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
) -> None:
    """A provider without accounts, end() without begin() and use after close() raise."""
    with pytest.raises(ValueError, match="no login accounts"):
        TokenPool(make_broker(), "svc")
    pool = make_pool()

    async def main() -> None:
        lease = await pool.acquire("client")
        with pytest.raises(RuntimeError):
            lease.end()
        lease.close()
        lease.close()
        with pytest.raises(RuntimeError):
            lease.begin()
        with pytest.raises(RuntimeError):
            lease.report_rejected("anything")
        assert "[RELEASED]" in repr(lease)

    asyncio.run(main())


def test_account_freed_while_a_cancelled_waiter_unwinds_goes_to_the_next(
    make_pool: Callable[..., TokenPool],
) -> None:
    """An account freed after a waiter's cancel but before it unwinds skips it for the next waiter."""
    pool = make_pool()

    async def main() -> None:
        leases = await _hold_all(pool)
        gone = asyncio.create_task(pool.acquire("gone"))
        await asyncio.sleep(0)
        late = asyncio.create_task(pool.acquire("late"))
        await asyncio.sleep(0)
        gone.cancel()
        leases[0].close()
        with pytest.raises(asyncio.CancelledError):
            await gone
        lease = await late
        assert lease.account == "alice"
        for held in (*leases[1:], lease):
            held.close()

    asyncio.run(main())
    stats = pool.stats()
    assert (stats.available, stats.waiting) == (3, 0)


def test_wait_timeout_firing_after_a_handoff_keeps_the_lease(
    make_pool: Callable[..., TokenPool],
) -> None:
    """If the wait timeout fires after an account was handed over, the acquirer keeps it."""
    pool = make_pool(wait_timeout=0.05)

    async def main() -> None:
        leases = await _hold_all(pool)
        waiter = asyncio.create_task(pool.acquire("waiter"))
        await asyncio.sleep(0)
        time.sleep(0.1)  # block the loop so the timeout is due before the handoff below
        await asyncio.sleep(0)
        leases[0].close()
        lease = await waiter
        assert lease.state is LeaseState.ACTIVE
        for held in (*leases[1:], lease):
            held.close()

    asyncio.run(main())
    assert pool.stats().available == 3


def test_oldest_wait_is_the_longest_queued_acquirer(
    make_pool: Callable[..., TokenPool],
) -> None:
    """stats().oldest_wait: None with nobody queued; the first live waiter's time in the
    queue (on the pool's clock) while acquirers wait; the next one's once it leaves."""
    clock = ManualClock()
    pool = make_pool(clock=clock)

    async def main() -> None:
        leases = await _hold_all(pool)
        assert pool.stats().oldest_wait is None
        first = asyncio.create_task(pool.acquire("first"))
        await asyncio.sleep(0)
        clock.advance(5)
        second = asyncio.create_task(pool.acquire("second"))
        await asyncio.sleep(0)
        clock.advance(2)
        stats = pool.stats()
        assert (stats.waiting, stats.oldest_wait) == (2, 7)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert pool.stats().oldest_wait == 2
        leases[0].close()
        (await second).close()
        assert pool.stats().oldest_wait is None
        for other in leases[1:]:
            other.close()

    asyncio.run(main())
