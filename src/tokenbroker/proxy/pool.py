"""A pool of login credentials leased one per client connection.

A login provider with N accounts can serve at most N clients at once when each
client must keep one account for the life of its connection. :class:`TokenPool`
hands out :class:`~tokenbroker.proxy.lease.PoolLease` objects, modelled on httpcore's
connection pool: every decision is made under one lock on the pool, I/O (logging in)
happens outside it, and pool, credentials (:mod:`~tokenbroker.proxy.credential`) and
leases (:mod:`~tokenbroker.proxy.lease`, where the lease states are drawn) are explicit
state machines.

The pool is driven from one event loop; only :meth:`TokenPool.stats` and the
broker's event callbacks may run on other threads (e.g. a metrics scrape).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..core.clock import Clock, SystemClock
from ..core.events import Event, EventBus, LeaseGranted, TokenAcquired
from ..engine.broker import Broker
from ..errors import LeaseExpiredError, PoolExhaustedError, ProviderError
from .credential import Credential, CredentialState, CredentialStats
from .lease import LeaseState, PoolLease

__all__ = [
    "CredentialState",
    "CredentialStats",
    "LeaseExpiredError",
    "LeaseGranted",
    "LeaseState",
    "PoolExhaustedError",
    "PoolLease",
    "PoolStats",
    "TokenPool",
]

logger = logging.getLogger("tokenbroker.pool")

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A consistent snapshot of the pool.

    Attributes:
        total: Accounts in the pool.
        in_use: Accounts held by a lease.
        available: Accounts free to lease now.
        waiting: Acquirers queued for an account.
        credentials: Per-account counters, in configuration order.
        oldest_wait: Seconds the longest-queued acquirer has waited so far (None: nobody
            waits).
    """

    total: int
    in_use: int
    available: int
    waiting: int
    credentials: tuple[CredentialStats, ...]
    oldest_wait: float | None = None


class TokenPool:
    """Lease the accounts of one login provider, one per client connection.

    Args:
        broker: The broker that logs in and caches each account's token.
        provider: A login provider's configured name.
        wait_timeout: Seconds an acquirer may wait in the queue; None waits forever.
        idle_timeout: :meth:`reap` expires a lease with no request for this long.
        max_lease_age: :meth:`reap` expires a lease held this long (when idle).
        retry_after: Seconds suggested to a client turned away by a wait timeout.
        clock: Time source for waits and reaping.

    Raises:
        ValueError: The provider has no accounts.
        UnknownProviderError: The provider is not configured.
    """

    def __init__(
        self,
        broker: Broker,
        provider: str,
        *,
        wait_timeout: float | None = None,
        idle_timeout: float | None = None,
        max_lease_age: float | None = None,
        retry_after: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        accounts = broker.accounts(provider)
        if not accounts:
            raise ValueError(f"provider {provider!r} has no login accounts to pool")
        self._broker = broker
        self.provider = provider
        self._wait_timeout = wait_timeout
        self._idle_timeout = idle_timeout
        self._max_lease_age = max_lease_age
        self._retry_after = retry_after
        self._clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._credentials = {
            name: Credential(name, i, broker.peeker(provider, account=name))
            for i, name in enumerate(accounts)
        }
        self._waiters: deque[PoolLease] = deque()
        self._leases: set[PoolLease] = set()
        self._released = len(accounts)
        self._closed = False
        self._events = EventBus()
        self._unsubscribe = broker.subscribe(self._on_event)

    # -- public API ------------------------------------------------------------------------

    async def acquire(self, owner: str) -> PoolLease:
        """Lease a credential, waiting first-in first-out while none is free.

        Cancelling the call (the client went away) leaves the queue without a credential.

        Args:
            owner: Who holds the lease, for diagnostics (e.g. the client's address).

        Returns:
            An ``ACTIVE`` lease.

        Raises:
            PoolExhaustedError: Nothing became free within ``wait_timeout``, or the
                pool was closed.
        """
        lease = PoolLease(self, owner)
        started = self._clock.monotonic()
        with self._lock:
            if self._closed:
                raise self._exhausted("the pool is closed")
            credential = None if self._waiters else self._pick()
            if credential is not None:
                self._grant(lease, credential)
            else:
                waiter = asyncio.get_running_loop().create_future()
                lease._waiter = waiter
                self._waiters.append(lease)
        if lease._waiter is not None:
            await self._wait(lease, lease._waiter)
        account = lease.account
        assert account is not None
        self._events.emit(
            LeaseGranted(self.provider, f"account={account}", self._clock.monotonic() - started)
        )
        return lease

    async def warm(
        self, *, concurrency: int = 8, progress: Progress | None = None
    ) -> dict[str, ProviderError]:
        """Log in every account now instead of on its first request.

        Idle accounts are ``REFRESHING`` meanwhile and not leased; an account whose
        login fails permanently becomes ``FAILED`` (a retryable failure leaves it
        ``AVAILABLE`` to retry on use).

        Args:
            concurrency: Logins in flight at once.
            progress: Called as ``progress(done, total)`` after each login.

        Returns:
            The failed accounts and their errors (empty when all succeeded).
        """
        gate = asyncio.Semaphore(max(1, concurrency))
        names = list(self._credentials)
        failures: dict[str, ProviderError] = {}
        done = 0

        async def one(name: str) -> None:
            nonlocal done
            async with gate:
                with self._lock:
                    credential = self._credentials[name]
                    if credential.state is not CredentialState.LEASED:
                        credential.state = CredentialState.REFRESHING
                error: ProviderError | None = None
                try:
                    await self._broker.aget_token(self.provider, account=name)
                except ProviderError as exc:
                    error = failures[name] = exc
                    self._fetch_failed(name, exc)
                with self._lock:
                    credential.broken = error is not None and not error.retryable
                    if credential.state is CredentialState.REFRESHING:
                        self._put_back(credential)
            done += 1
            if progress is not None:
                progress(done, len(names))

        await asyncio.gather(*(one(name) for name in names))
        return failures

    def reap(self) -> int:
        """Expire leases idle for ``idle_timeout`` or held for ``max_lease_age``.

        Only leases with no request in flight are expired; their credentials go
        back to the pool (to the first waiter, if any).

        Returns:
            How many leases were expired.
        """
        now = self._clock.monotonic()
        expired = 0
        with self._lock:
            for lease in list(self._leases):
                if lease.state is not LeaseState.ACTIVE or lease._in_flight:
                    continue
                idle = self._idle_timeout is not None and now - lease._active_at >= (
                    self._idle_timeout
                )
                old = self._max_lease_age is not None and now - lease._acquired_at >= (
                    self._max_lease_age
                )
                if idle or old:
                    self._release(lease, LeaseState.EXPIRED)
                    expired += 1
        if expired:
            logger.info("reaped %d lease(s) provider=%s", expired, self.provider)
        return expired

    def stats(self) -> PoolStats:
        """A consistent snapshot of counts and per-account counters; thread-safe."""
        now = self._clock.monotonic()
        with self._lock:
            credentials = tuple(
                CredentialStats(
                    c.account,
                    c.state,
                    c.uses,
                    c.errors,
                    c.refreshes,
                    None if c.last_used is None else max(0.0, now - c.last_used),
                )
                for c in self._credentials.values()
            )
            waiting = 0
            oldest: float | None = None
            for lease in self._waiters:  # FIFO: the first waiting one waited longest
                if lease.state is LeaseState.WAITING:
                    waiting += 1
                    if oldest is None:
                        oldest = max(0.0, now - lease.requested_at)
        states = [c.state for c in credentials]
        return PoolStats(
            total=len(credentials),
            in_use=states.count(CredentialState.LEASED),
            available=states.count(CredentialState.AVAILABLE),
            waiting=waiting,
            credentials=credentials,
            oldest_wait=oldest,
        )

    def subscribe(self, subscriber: Callable[[Event], None]) -> Callable[[], None]:
        """Receive :class:`LeaseGranted` events (e.g. for a lease-wait histogram).

        Returns:
            A function that removes the subscription.
        """
        return self._events.subscribe(subscriber)

    def close(self) -> None:
        """Stop: turn away queued and future acquirers with :class:`PoolExhaustedError`."""
        with self._lock:
            self._closed = True
            while self._waiters:
                lease = self._waiters.popleft()
                lease.state = LeaseState.CANCELLED
                if lease._waiter is not None and not lease._waiter.done():
                    lease._waiter.set_exception(self._exhausted("the pool is closed"))
        self._unsubscribe()

    def __repr__(self) -> str:
        stats = self.stats()
        return (
            f"<TokenPool [{'CLOSED' if self._closed else 'OPEN'}] provider={self.provider!r} "
            f"total={stats.total} in_use={stats.in_use} available={stats.available} "
            f"waiting={stats.waiting}>"
        )

    # -- decisions, all under self._lock ---------------------------------------------------

    def _pick(self) -> Credential | None:
        """The available credential idle longest, spreading use over accounts."""
        free = [c for c in self._credentials.values() if c.state is CredentialState.AVAILABLE]
        return min(free, key=lambda c: c.idle_since) if free else None

    def _grant(self, lease: PoolLease, credential: Credential) -> None:
        now = self._clock.monotonic()
        credential.state = CredentialState.LEASED
        lease._credential = credential
        lease.state = LeaseState.ACTIVE
        lease._acquired_at = lease._active_at = now
        self._leases.add(lease)

    def _put_back(self, credential: Credential) -> None:
        """Hand a freed credential to the first live waiter, else mark it idle."""
        if credential.broken:
            credential.state = CredentialState.FAILED
            return
        while self._waiters:
            lease = self._waiters.popleft()
            waiter = lease._waiter
            if waiter is None or waiter.done():  # cancelled; its task has not run yet
                lease.state = LeaseState.CANCELLED
                continue
            self._grant(lease, credential)
            waiter.set_result(None)
            return
        credential.state = CredentialState.AVAILABLE
        credential.idle_since = self._released
        self._released += 1

    def _release(self, lease: PoolLease, state: LeaseState) -> None:
        credential = lease._credential
        lease.state = state
        lease._credential = None
        self._leases.discard(lease)
        if credential is not None:
            self._put_back(credential)

    def _abandon(self, lease: PoolLease, *, keep: bool) -> bool:
        """Settle a wait that ended without its result; True if the lease keeps a credential."""
        with self._lock:
            if lease.state is LeaseState.WAITING:
                self._waiters.remove(lease)
                lease.state = LeaseState.CANCELLED
                return False
            if lease.state is LeaseState.ACTIVE:
                if keep:
                    return True
                self._release(lease, LeaseState.CANCELLED)
            return False

    def _holding(self, lease: PoolLease) -> str:
        with self._lock:
            credential = lease._credential
            if lease.state is LeaseState.EXPIRED:
                raise LeaseExpiredError("the lease was reaped; acquire a new one")
            if credential is None:
                raise RuntimeError(f"{lease!r} holds no credential")
            return credential.account

    def _begin(self, lease: PoolLease) -> None:
        with self._lock:
            if lease.state is LeaseState.EXPIRED:
                raise LeaseExpiredError("the lease was reaped; acquire a new one")
            if lease.state is not LeaseState.ACTIVE or lease._credential is None:
                raise RuntimeError(f"cannot begin a request on {lease!r}")
            lease._in_flight += 1
            lease._active_at = lease._credential.last_used = self._clock.monotonic()
            lease._credential.uses += 1

    def _end(self, lease: PoolLease) -> None:
        with self._lock:
            if lease._in_flight <= 0:
                raise RuntimeError(f"end() without begin() on {lease!r}")
            lease._in_flight -= 1
            lease._active_at = self._clock.monotonic()
            if lease.state is LeaseState.CLOSING and not lease._in_flight:
                self._release(lease, LeaseState.RELEASED)

    def _close(self, lease: PoolLease) -> None:
        with self._lock:
            if lease.state is LeaseState.ACTIVE:
                if lease._in_flight:
                    lease.state = LeaseState.CLOSING
                else:
                    self._release(lease, LeaseState.RELEASED)

    def _count_error(self, account: str) -> None:
        with self._lock:
            self._credentials[account].errors += 1

    def _fetch_failed(self, account: str, exc: ProviderError) -> None:
        logger.warning(
            "login failed provider=%s account=%s error=%s",
            self.provider,
            account,
            type(exc).__name__,
        )
        with self._lock:
            credential = self._credentials[account]
            credential.errors += 1
            credential.broken = not exc.retryable

    def _on_event(self, event: Event) -> None:
        """Count logins per account from the broker's events (any thread)."""
        if not isinstance(event, TokenAcquired) or event.provider != self.provider:
            return
        account = event.key.removeprefix("account=")
        with self._lock:
            credential = self._credentials.get(account)
            if credential is not None:
                credential.refreshes += 1
                credential.broken = False

    # -- I/O outside the lock --------------------------------------------------------------

    async def _wait(self, lease: PoolLease, waiter: asyncio.Future[None]) -> None:
        try:
            async with asyncio.timeout(self._wait_timeout):
                await waiter
        except TimeoutError:
            if self._abandon(lease, keep=True):
                return
            raise self._exhausted(
                f"no credential of provider {self.provider!r} became free "
                f"within {self._wait_timeout}s"
            ) from None
        except BaseException:
            self._abandon(lease, keep=False)
            raise

    def _exhausted(self, message: str) -> PoolExhaustedError:
        return PoolExhaustedError(
            message, retry_after=math.ceil(self._retry_after), provider=self.provider
        )
