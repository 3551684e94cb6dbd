"""Rate limits: per consumer (the HTTP API), and failed key checks per client address
(the HTTP API and the proxy's ``consumer_header``, each with its own counts).

The failed-key limit applies to failures only: a key is checked first, and a valid one is
served whatever its address's failures (keys have 256 random bits, so the limit is about
load and noise from wrong keys, not about making guessing feasible or not).

Built on the ``limits`` library's moving windows with in-memory storage. In cluster mode
the counts are shared by every process through :class:`SharedWindows` (Redis, see
:mod:`tokenbroker.cluster.windows`), so N replicas do not multiply a limit by N; when Redis
does not answer the in-process counts apply instead (degraded, never down). Callers on an
event loop use the ``a…`` methods, which never block it and wait at most the link's short
budget for Redis. A blocked caller learns how long to wait (``Retry-After``).
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ..errors import CoordinationUnavailableError

__all__ = ["DEFAULT_AUTH_FAILURES", "RateLimits", "SharedWindows"]

#: Failed key checks allowed per client address before it is told to wait.
DEFAULT_AUTH_FAILURES = "10/minute"


class SharedWindows(Protocol):
    """Moving windows counted across processes (cluster mode)."""

    def hit(self, name: str, key: str, limit: int, window: float) -> float | None:
        """Count one hit of ``key`` in window ``name`` (``limit`` hits per ``window`` seconds).

        Returns:
            None when counted, else seconds until a hit is allowed again.

        Raises:
            CoordinationUnavailableError: The shared counts cannot be reached now.
        """

    async def ahit(self, name: str, key: str, limit: int, window: float) -> float | None:
        """:meth:`hit` without blocking the event loop, giving up after a short budget.

        Raises:
            CoordinationUnavailableError: The shared counts did not answer in time.
        """


class RateLimits:
    """The API's limits.

    Args:
        per_consumer: e.g. ``50/second`` for each consumer, or None for no limit.
        auth_failures: Failed authentications allowed per client address.
        shared: Counts shared with other processes; None (or unreachable): this process's.

    Raises:
        ValueError: For a limit string the ``limits`` library cannot parse.
    """

    def __init__(
        self,
        per_consumer: str | None = None,
        auth_failures: str = DEFAULT_AUTH_FAILURES,
        *,
        shared: SharedWindows | None = None,
    ):
        self.shared = shared
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._consumer: RateLimitItem | None = parse(per_consumer) if per_consumer else None
        self._failures = parse(auth_failures)

    def __repr__(self) -> str:
        return f"RateLimits(per_consumer={self._consumer}, auth_failures={self._failures})"

    def failed(self, source: str) -> float | None:
        """Count one failed key check from ``source``.

        Only failures are counted, and only they are refused: a valid key is never held back
        by the failures of others sharing its address (a NAT, a proxy).

        Returns:
            Seconds ``source`` must wait once over its budget of failures, else None.
        """
        return self._hit(self._failures, "fail", source)

    def consumer_blocked(self, name: str) -> float | None:
        """Count one request of consumer ``name``; seconds to wait if over its limit, or None."""
        if self._consumer is None:
            return None
        return self._hit(self._consumer, "consumer", name)

    async def afailed(self, source: str) -> float | None:
        """:meth:`failed` for a caller on an event loop (never blocks it on Redis)."""
        return await self._ahit(self._failures, "fail", source)

    async def aconsumer_blocked(self, name: str) -> float | None:
        """:meth:`consumer_blocked` for a caller on an event loop (never blocks it on Redis)."""
        if self._consumer is None:
            return None
        return await self._ahit(self._consumer, "consumer", name)

    async def _ahit(self, item: RateLimitItem, name: str, key: str) -> float | None:
        """One hit, counted across processes when Redis answers within its budget."""
        if self.shared is not None:
            try:
                wait = await self.shared.ahit(name, key, item.amount, item.get_expiry())
            except CoordinationUnavailableError:
                pass  # slow or away: count here (the breaker logs an outage once)
            else:
                return None if wait is None else max(1.0, math.ceil(wait))
        return self._local(item, name, key)

    def _hit(self, item: RateLimitItem, name: str, key: str) -> float | None:
        """One hit, counted across processes when possible, else in this one."""
        if self.shared is not None:
            try:
                wait = self.shared.hit(name, key, item.amount, item.get_expiry())
            except CoordinationUnavailableError:
                pass  # the breaker logged it once; count here meanwhile
            else:
                return None if wait is None else max(1.0, math.ceil(wait))
        return self._local(item, name, key)

    def _local(self, item: RateLimitItem, name: str, key: str) -> float | None:
        """One hit counted in this process."""
        if self._limiter.hit(item, name, key):
            return None
        return self._wait(item, name, key)

    def _wait(self, item: RateLimitItem, *keys: str) -> float:
        reset = self._limiter.get_window_stats(item, *keys).reset_time
        # ``reset_time`` is on the ``limits`` library's clock, which is always time.time()
        # (its storages take no clock), so the wait is measured on that same clock.
        return max(1.0, math.ceil(reset - time.time()))
