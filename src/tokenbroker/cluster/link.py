"""The one Redis connection of a process: bounded calls, a small retry, and a circuit breaker.

:class:`RedisLink` runs a redis-py asyncio client (with hiredis) on its own event loop in a
daemon thread, so the broker's threads (refreshes) and its event loop (rate limits) call it
alike, each call bounded by a deadline. redis-py's defaults stalled a call 59 s against a
paused Redis when measured here, so every connection gets explicit connect and read
timeouts (``timeout``, 0.5 s by default), a retry of one on a refused or reset connection
(never on a timeout: that would double the wait), and ``health_check_interval``. A
:class:`~tokenbroker.cluster.breaker.Breaker` stops calls after failures; only the
background ping (every ``probe_seconds``) closes it again, so once it is open no request
ever waits for Redis to answer — a request is never the breaker's probe.

Callers on an event loop use :meth:`RedisLink.acall`, which never blocks their loop and
waits at most ``budget`` (0.1 s by default) before giving up: a request path that would
rather count in its own process than wait (a shared rate limit) stays fast while Redis is
paused and before the breaker has opened. The call itself still runs to its own timeout
and its outcome feeds the breaker.

The URL may carry redis-py's own options as its query (``?socket_timeout=0.2``); they win
over the defaults here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.secret import Secret
from ..errors import ConfigError, ConfigProblem, CoordinationUnavailableError
from .breaker import Breaker, BreakerState

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["EXTRA_MISSING", "RedisLink"]

logger = logging.getLogger("tokenbroker.cluster")

T = TypeVar("T")

#: What ``check`` and the broker say when ``redis:`` is set but the extra is not installed.
EXTRA_MISSING = "needs the redis client: pip install 'tokenbroker[redis]'"


def _import_redis() -> Any:
    try:
        import redis.asyncio  # noqa: PLC0415 - an optional extra, imported only when configured
    except ImportError as exc:
        raise ConfigError([ConfigProblem("redis", EXTRA_MISSING)]) from exc
    return redis


class RedisLink:
    """A bounded, breaker-guarded Redis client for synchronous and asynchronous callers.

    Args:
        url: ``redis://`` or ``rediss://`` URL (a :class:`~tokenbroker.core.secret.Secret`:
            it may hold a password; it is never logged).
        timeout: Seconds for connecting, for reading a reply, and for a whole call.
        retries: Retries of a call whose connection was refused or reset.
        health_check_interval: Seconds after which an idle connection is pinged before use.
        probe_seconds: How often a background ping checks Redis (and closes the breaker).
        breaker: The circuit breaker (default: 2 failures open it for 2 s).
        budget: Longest wait of :meth:`acall` for an answer (seconds).

    Raises:
        ConfigError: The ``redis`` extra is not installed.
    """

    def __init__(
        self,
        url: Secret | str,
        *,
        timeout: float = 0.5,
        retries: int = 1,
        health_check_interval: int = 5,
        probe_seconds: float = 1.0,
        breaker: Breaker | None = None,
        budget: float = 0.1,
    ) -> None:
        redis = _import_redis()
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import ExponentialBackoff  # noqa: PLC0415

        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
            TimeoutError,
            concurrent.futures.TimeoutError,
        )
        self.timeout = timeout
        self.budget = min(budget, timeout)
        self.breaker = breaker or Breaker()
        self._probe_seconds = probe_seconds
        secret = url if isinstance(url, Secret) else Secret(url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tokenbroker-redis", daemon=True
        )
        self._thread.start()
        self.client: Redis = redis.asyncio.Redis.from_url(
            secret.reveal(),
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(
                ExponentialBackoff(cap=0.05, base=0.01),
                retries,
                supported_errors=(redis.exceptions.ConnectionError,),
            ),
            health_check_interval=health_check_interval,
        )
        self._closed = False
        self._tasks: list[concurrent.futures.Future[None]] = [self.spawn(self._probe())]

    def __repr__(self) -> str:
        return f"RedisLink(breaker={self.breaker!r})"

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The exception classes that mean "Redis did not answer"."""
        return self._errors

    def call(self, operation: Callable[[Redis], Awaitable[T]]) -> T:
        """Run ``operation(client)`` on the link's loop and wait at most :attr:`timeout`.

        Safe from any thread, including another event loop's (it blocks that loop for at most
        the timeout, and not at all while the breaker is open).

        Returns:
            What ``operation`` returned.

        Raises:
            CoordinationUnavailableError: The breaker is open, or Redis failed or was too slow
                (recorded in the breaker). The message carries an error class, never a URL.
        """
        if not self._admits():
            raise CoordinationUnavailableError(self.breaker.reason or "redis link closed")
        future = asyncio.run_coroutine_threadsafe(self._bounded(operation), self._loop)
        try:
            result = future.result(self.timeout + 0.25)
        except self._errors as exc:
            future.cancel()
            self.breaker.failed(exc)
            raise CoordinationUnavailableError(f"redis unreachable: {type(exc).__name__}") from exc
        self.breaker.succeeded()
        return result

    async def acall(self, operation: Callable[[Redis], Awaitable[T]]) -> T:
        """Run ``operation(client)`` on the link's loop; await it at most :attr:`budget`.

        Never blocks the calling event loop. Past the budget the caller goes on without the
        answer while the call runs to its own timeout in the background, its outcome feeding
        the breaker (so a paused Redis opens it after ``threshold`` timeouts, however many
        callers gave up before that).

        Returns:
            What ``operation`` returned.

        Raises:
            CoordinationUnavailableError: The breaker is open, Redis failed, or it did not
                answer within the budget.
        """
        if not self._admits():
            raise CoordinationUnavailableError(self.breaker.reason or "redis link closed")
        future = asyncio.run_coroutine_threadsafe(self._bounded(operation), self._loop)
        future.add_done_callback(self._record)
        try:
            async with asyncio.timeout(self.budget):
                return await asyncio.shield(asyncio.wrap_future(future))
        except TimeoutError as exc:
            raise CoordinationUnavailableError("redis slow: no answer within budget") from exc
        except self._errors as exc:
            raise CoordinationUnavailableError(f"redis unreachable: {type(exc).__name__}") from exc

    def submit(self, operation: Callable[[Redis], Awaitable[object]]) -> None:
        """Run ``operation(client)`` without waiting for it (a publish); its outcome still
        feeds the breaker. Does nothing while the breaker is open."""
        if not self._admits():
            return
        future = asyncio.run_coroutine_threadsafe(self._bounded(operation), self._loop)
        future.add_done_callback(self._record)

    def spawn(self, coroutine: Awaitable[None]) -> concurrent.futures.Future[None]:
        """Run a long-lived task (a subscriber) on the link's loop."""

        async def run() -> None:
            await coroutine

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def close(self) -> None:
        """Stop the background tasks, close the connections and the loop thread."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(*self._errors, RuntimeError):
            asyncio.run_coroutine_threadsafe(self.client.aclose(), self._loop).result(1.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2.0)
        if not self._thread.is_alive():
            self._loop.close()

    def add_task(self, coroutine: Awaitable[None]) -> None:
        """Run ``coroutine`` on the link's loop until :meth:`close`."""
        self._tasks.append(self.spawn(coroutine))

    # -- internals ---------------------------------------------------------------------------

    def _admits(self) -> bool:
        """Whether traffic may call Redis now: only while the breaker is closed. The
        background probe alone reopens the way (a request never waits as the probe)."""
        return not self._closed and self.breaker.state is BreakerState.CLOSED

    async def _bounded(self, operation: Callable[[Redis], Awaitable[T]]) -> T:
        async with asyncio.timeout(self.timeout):
            return await operation(self.client)

    def _record(self, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self.breaker.succeeded()
        elif isinstance(error, self._errors):
            self.breaker.failed(error)
        else:
            logger.warning("redis call failed: %s", type(error).__name__)

    async def _probe(self) -> None:
        """Ping every ``probe_seconds``: a failure counts against the breaker, an answer
        closes it, so a Redis that comes back is used again without waiting for traffic.
        It is the only way back to ``closed`` (requests never probe), so it never stops."""
        while True:
            try:
                await self._bounded(lambda client: client.ping())
            except asyncio.CancelledError:
                raise
            except self._errors as exc:
                self.breaker.failed(exc)
            except Exception as exc:  # anything else (a protocol error): keep probing
                logger.debug("redis probe failed: %s", type(exc).__name__)
                self.breaker.failed(exc)
            else:
                self.breaker.succeeded()
            await asyncio.sleep(self._probe_seconds)
