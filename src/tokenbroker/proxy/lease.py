"""A client connection's claim on one pooled account, as an explicit state machine.

:meth:`TokenPool.acquire <tokenbroker.proxy.pool.TokenPool.acquire>` hands out
:class:`PoolLease` objects; every state change is decided by the pool under its lock.

Lease states::

    WAITING ──► ACTIVE ──► CLOSING ──► RELEASED      (closed; last request ended)
       │          │  └───────────────► RELEASED      (closed with nothing in flight)
       │          └──► EXPIRED                       (reaped: idle too long or too old)
       └──► CANCELLED                                (wait timed out or was cancelled)

The token is never stored on a lease: :meth:`PoolLease.token` reads the broker's
*current* token for the leased account on every request, so a background
refresh or a re-login after :meth:`PoolLease.report_rejected` applies to the next
request.

A request's :meth:`PoolLease.begin` and :meth:`PoolLease.end` on an active lease only
bump counters that the pool's event loop alone writes, so they skip the lock.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..core.token import Token
from ..errors import ProviderError
from .credential import Credential

if TYPE_CHECKING:
    from .pool import TokenPool

__all__ = ["LeaseState", "PoolLease"]


class LeaseState(enum.Enum):
    """Where a :class:`PoolLease` is in its life."""

    WAITING = "waiting"
    ACTIVE = "active"
    CLOSING = "closing"
    RELEASED = "released"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class PoolLease:
    """One client connection's claim on one credential, from :meth:`TokenPool.acquire`.

    Wrap each request in :meth:`request` (or :meth:`begin` / :meth:`end`) and call
    :meth:`close` when the client connection closes; the credential returns to the
    pool once the lease is closed *and* no request is in flight.
    """

    def __init__(self, pool: TokenPool, owner: str) -> None:
        self._pool = pool
        self.owner = owner
        self.state = LeaseState.WAITING
        self._credential: Credential | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._in_flight = 0
        self._acquired_at = 0.0
        self._active_at = 0.0
        #: When the lease was asked for (the pool's clock); granted at :attr:`acquired_at`.
        self.requested_at = pool._clock.monotonic()

    @property
    def account(self) -> str | None:
        """The leased account's name while the lease holds one."""
        credential = self._credential
        return credential.account if credential is not None else None

    @property
    def acquired_at(self) -> float:
        """When the pool granted the lease an account (the pool's clock; 0 before)."""
        return self._acquired_at

    @property
    def in_flight(self) -> int:
        """Requests begun and not yet ended."""
        return self._in_flight

    async def token(self) -> Token:
        """Return the leased account's current token, logging in if it has none.

        Returns:
            The token; read afresh on every call so refreshes take effect.

        Raises:
            LeaseExpiredError: The lease was reaped.
            RuntimeError: The lease is not holding a credential.
            ProviderError: Logging in failed (counted as an error of the account).
        """
        account = self._pool._holding(self)
        try:
            return await self._pool._broker.aget_token(self._pool.provider, account=account)
        except ProviderError as exc:
            self._pool._fetch_failed(account, exc)
            raise

    def token_nowait(self) -> Token | None:
        """The leased account's token if it is cached and fresh, else None (never fetches).

        The synchronous fast path of :meth:`token`; None also when the lease holds nothing.
        """
        credential = self._credential
        if credential is None or self.state is not LeaseState.ACTIVE:
            return None
        return credential.peek()

    def report_rejected(self, access_token: str) -> bool:
        """Report that the upstream rejected ``access_token`` (e.g. a 401).

        The broker drops it only if it is still the account's current token
        (compare-and-invalidate), so many reports of one token cause one re-login.

        Args:
            access_token: The token the upstream rejected.

        Returns:
            True if it was current and was dropped.

        Raises:
            LeaseExpiredError: The lease was reaped.
            RuntimeError: The lease is not holding a credential.
        """
        account = self._pool._holding(self)
        self._pool._count_error(account)
        return self._pool._broker.invalidate(self._pool.provider, access_token, account=account)

    def begin(self) -> None:
        """Mark a request on this connection as started.

        Raises:
            LeaseExpiredError: The lease was reaped; acquire a new one.
            RuntimeError: The lease is closed or not yet granted.
        """
        credential = self._credential
        if self.state is LeaseState.ACTIVE and credential is not None:
            # Counters only, written by the pool's event loop alone: no lock on the
            # per-request path (stats() may read them a moment stale).
            self._in_flight += 1
            self._active_at = credential.last_used = self._pool._clock.monotonic()
            credential.uses += 1
            return
        self._pool._begin(self)  # raises the right error under the lock

    def end(self) -> None:
        """Mark a request begun with :meth:`begin` as finished."""
        if self.state is LeaseState.ACTIVE and self._in_flight > 0:
            self._in_flight -= 1
            self._active_at = self._pool._clock.monotonic()
            return
        self._pool._end(self)  # the last request of a closing lease releases it

    @contextmanager
    def request(self) -> Iterator[PoolLease]:
        """``with lease.request(): ...`` — :meth:`begin` on entry, :meth:`end` on exit."""
        self.begin()
        try:
            yield self
        finally:
            self.end()

    def close(self) -> None:
        """The client connection closed; idempotent.

        The credential returns to the pool now, or when the last in-flight request ends.
        """
        self._pool._close(self)

    def __repr__(self) -> str:
        return (
            f"<PoolLease [{self.state.name}] owner={self.owner!r} account={self.account!r} "
            f"in_flight={self._in_flight}>"
        )
