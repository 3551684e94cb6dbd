"""The token cache: lock-free hits, single-flight fetches, refresh-ahead (STYLE 5).

For every key the cache holds at most one access token and at most one
in-flight fetch (a *flight*). The rules:

* A hit is a dict lookup and one clock compare — no lock, no event loop.
* Past ``refresh_ahead`` of a token's lifetime, the first caller starts one
  background refresh and everyone keeps getting the current token.
* Background refreshes run on a bounded pool of worker threads (``concurrency``):
  200 keys due at once make at most that many token requests at a time, and a key
  whose refresh is still queued keeps serving its current token.
* Within ``skew`` of expiry a token is never handed out; callers wait for the
  one flight (threads block on it, asyncio tasks await it) and all get the
  winner's token or the winner's error.
* A failed fetch is remembered with backoff: until it may be retried, callers
  with no valid token get that error without another request to the provider
  (a reauthorization error is remembered until :meth:`TokenCache.reset`).
* :meth:`TokenCache.invalidate` drops a token only if it is still the current
  one, so many consumers reporting the same rejected token cause one fetch; and
  after it has dropped one, it drops none for that key during the key's
  ``invalidate_cooldown`` (an upstream that rejects every token cannot make the
  cache log in, or rotate a single-use refresh token, once per rejection).
* With ``shared`` limits (cluster mode) that cooldown is one per key across every
  process, and a dropped token is announced: another process drops the same token from
  its cache within milliseconds (the store stays the record; a lost notice only means
  that process serves the token until its own consumers report it).

Sync and async callers share the same slots and flights: a flight is a
:class:`concurrent.futures.Future` that a thread or a task completes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from ..core.clock import Clock, SystemClock
from ..core.events import EventBus, TokenAcquired, TokenRequestFailed
from ..core.token import Token
from ..core.tracing import NOOP, Span
from ..errors import ProviderError, ProviderUnavailableError
from ..grants import TokenResponse
from .coordination import SharedLimits
from .fetcher import Fetcher
from .invalidation import Invalidations
from .slot import DEGRADED, Entry, Slot, SlotState, Timing, schedule, worst

# DEGRADED, SlotState and worst live in .slot; importers of them from here keep working.
__all__ = ["DEGRADED", "Fetcher", "SlotState", "Timing", "TokenCache", "worst"]

logger = logging.getLogger("tokenbroker.cache")

K = TypeVar("K", bound=Hashable)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as seen (its waiter may have gone)."""
    if not future.cancelled():
        future.exception()


def _outcome(token: Token | None, flight: Future[Any] | None, leader: bool) -> str:
    """A token acquisition's span ``outcome`` (``failed`` is set by whoever sees it fail)."""
    if token is not None:
        return "refreshed-ahead" if leader and flight is not None else "hit"
    return "fetched" if leader else "coalesced"


class TokenCache(Invalidations[K]):
    """Access tokens per key with single-flight fetching and refresh-ahead.

    Args:
        fetcher: Resolves keys and fetches tokens.
        clock: Time source; tests inject :class:`~tokenbroker.core.clock.ManualClock`.
        events: Where :class:`~tokenbroker.core.events.Event` objects go.
        concurrency: Most background refreshes running at once (worker threads).
        shared: Cooldowns counted across processes and "token dropped" fan-out (cluster
            mode); None: this process only.
    """

    def __init__(
        self,
        fetcher: Fetcher[K],
        *,
        clock: Clock | None = None,
        events: EventBus | None = None,
        concurrency: int = 8,
        shared: SharedLimits | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._fetcher = fetcher
        self._clock = clock or SystemClock()
        self._now = self._clock.monotonic
        self._events = events or EventBus()
        self._hot: dict[Hashable, Entry] = {}
        self._aliases: dict[Hashable, Slot[K]] = {}
        self._slots: dict[K, Slot[K]] = {}
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # Threads start on demand, up to ``concurrency``; queued refreshes wait their turn.
        self._workers = ThreadPoolExecutor(concurrency, thread_name_prefix="tokenbroker-refresh")
        self._background: set[Future[None]] = set()
        self._rng = random.Random()  # noqa: S311 - jitter, not security
        self._shared = shared
        if shared is not None:
            shared.on_dropped(self._dropped_elsewhere)

    def __repr__(self) -> str:
        return f"TokenCache(keys={len(self._slots)})"

    def get(self, raw: Hashable) -> Token:
        """Return a valid token for ``raw``, fetching it if needed (blocking).

        Args:
            raw: The caller's key, resolved by the fetcher.

        Returns:
            The access token.

        Raises:
            ProviderError: When no valid token could be obtained.
            UnknownProviderError: For keys the fetcher does not know.
        """
        entry = self._hot.get(raw)
        if entry is not None and self._now() < entry.refresh_at:
            return entry.token
        return self.fill(raw)

    def fill(self, raw: Hashable, span: Span = NOOP) -> Token:
        """:meth:`get` past a hit (no token due or none cached); ``span`` gets ``outcome``."""
        slot = self._slot(raw)
        token, flight, leader = self._decide(slot)
        if token is not None:
            if leader and flight is not None:
                self._submit(slot, flight)
            span.set("outcome", _outcome(token, flight, leader))
            return token
        assert flight is not None
        span.set("outcome", _outcome(token, flight, leader))
        if leader:
            self._run_sync(slot, flight, False)
        try:
            return flight.result(timeout=self._fetcher.timing(slot.key).deadline + 5.0).token
        except FutureTimeout:
            raise self._stuck(slot) from None

    def peek(self, raw: Hashable) -> Token | None:
        """The token for ``raw`` if it is cached and not yet due for refresh; never fetches.

        Args:
            raw: The caller's key.

        Returns:
            The token, or None (then call :meth:`get` or :meth:`aget`).
        """
        entry = self._hot.get(raw)
        if entry is not None and self._now() < entry.refresh_at:
            return entry.token
        return None

    async def aget(self, raw: Hashable) -> Token:
        """Like :meth:`get`, awaiting instead of blocking; a hit never yields to the loop.

        Args:
            raw: The caller's key, resolved by the fetcher.

        Returns:
            The access token.
        """
        entry = self._hot.get(raw)
        if entry is not None and self._now() < entry.refresh_at:
            return entry.token
        return await self.afill(raw)

    async def afill(self, raw: Hashable, span: Span = NOOP) -> Token:
        """:meth:`aget` past a hit, as :meth:`fill`."""
        slot = self._slot(raw)
        token, flight, leader = self._decide(slot)
        span.set("outcome", _outcome(token, flight, leader))
        if leader and flight is not None:
            if token is not None:
                self._submit(slot, flight)
            else:
                task = asyncio.get_running_loop().create_task(self._run_async(slot, flight))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if token is not None:
            return token
        assert flight is not None
        timeout = self._fetcher.timing(slot.key).deadline + 5.0
        waiter = asyncio.wrap_future(flight)
        # A caller that gives up (cancelled, or the loop shutting down) must not leave
        # the shared fetch's failure behind as an "exception was never retrieved" error.
        waiter.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(timeout):
                done = await asyncio.shield(waiter)
        except TimeoutError:
            raise self._stuck(slot) from None
        return done.token

    def reset(self, raw: Hashable) -> None:
        """Forget a key's token and remembered error (e.g. after re-authorisation).

        Args:
            raw: The caller's key.
        """
        slot = self._slot(raw)
        with slot.lock:
            self._install(slot, None)
            slot.clear_error()

    def refresh_due(self) -> int:
        """Start a background refresh for every key past its refresh-ahead point.

        Callers trigger refresh-ahead themselves; a service calls this from a
        ticker so tokens stay warm even when nobody asks for a while. Never blocks:
        the refreshes queue for the bounded pool of refresh workers.

        Returns:
            How many refreshes were started.
        """
        started = 0
        for slot in list(self._slots.values()):
            entry = slot.entry
            if entry is None or self._now() < entry.refresh_at:
                continue
            with slot.lock:
                now = self._now()
                if slot.flight is not None or now < slot.retry_at or slot.entry is not entry:
                    continue
                flight = slot.open_flight()
            self._submit(slot, flight)
            started += 1
        return started

    def prefetch(self, raw: Hashable) -> bool:
        """Start a background fetch for ``raw`` unless it has a token not yet due for refresh,
        a fetch in flight, or a remembered failure still backing off. Never blocks.

        Args:
            raw: The caller's key.

        Returns:
            True if a fetch was started.
        """
        slot = self._slot(raw)
        with slot.lock:
            now = self._now()
            entry = slot.entry
            if entry is not None and now < entry.refresh_at:
                return False
            if slot.flight is not None or now < slot.retry_at:
                return False
            flight = slot.open_flight()
        self._submit(slot, flight)
        return True

    def retry_in(self, raw: Hashable) -> float:
        """Seconds until a remembered failure of ``raw`` stops being served; never fetches.

        Until then a caller without a valid token gets the remembered error and the provider
        is not asked (one request for N callers). A job retrying an item waits this long so
        its next attempt is a real request; the failure itself is left alone.

        Args:
            raw: The caller's key.

        Returns:
            0.0 when no failure is remembered (or the cache has not seen the key);
            ``math.inf`` for a reauthorization error (remembered until :meth:`reset`).
        """
        slot = self._find(raw)
        if slot is None:
            return 0.0
        with slot.lock:  # error and retry_at change together
            if slot.error is None:
                return 0.0
            return max(0.0, slot.retry_at - self._now())

    def usable(self, raw: Hashable) -> bool:
        """Whether ``raw`` has a token that may still be handed out; never fetches.

        Args:
            raw: The caller's key.

        Returns:
            True if a caller would get a token without waiting for a fetch.
        """
        slot = self._find(raw)
        entry = slot.entry if slot is not None else None
        return entry is not None and self._now() < entry.hard_expiry

    def state(self, raw: Hashable) -> SlotState | None:
        """What the cache knows about one key; never fetches.

        Args:
            raw: The caller's key.

        Returns:
            Its state, or None if the cache has not seen the key.
        """
        slot = self._find(raw)
        return None if slot is None else self._state(slot, self._now())

    def states(self) -> list[SlotState]:
        """A snapshot of every key the cache has seen.

        Returns:
            One :class:`SlotState` per canonical key.
        """
        now = self._now()
        return [self._state(slot, now) for slot in list(self._slots.values())]

    async def aclose(self) -> None:
        """Wait for the fetches and background refreshes under way to finish."""
        waiting: list[asyncio.Future[None]] = [*self._tasks]
        waiting += [asyncio.wrap_future(f) for f in list(self._background)]
        if waiting:
            await asyncio.gather(*waiting, return_exceptions=True)

    def close(self) -> None:
        """Drop queued background refreshes (their waiters get an error); running ones finish."""
        self._workers.shutdown(wait=False, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------------

    def _find(self, raw: Hashable) -> Slot[K] | None:
        """The slot for ``raw`` if the cache has one; never creates one."""
        slot = self._aliases.get(raw)
        if slot is None:
            slot = self._slots.get(self._fetcher.resolve(raw))
        return slot

    def _state(self, slot: Slot[K], now: float) -> SlotState:
        provider, key = self._fetcher.describe(slot.key)
        entry, error = slot.entry, slot.error
        return SlotState(
            provider=provider,
            key=key,
            state=slot.state(now),
            valid_until=entry.token.expires_at if entry else None,
            last_refresh=slot.last_refresh,
            last_error=type(error).__name__ if error is not None else None,
        )

    def _submit(self, slot: Slot[K], flight: Future[Entry]) -> None:
        """Queue a background refresh of ``slot`` (whose ``flight`` the caller just opened)."""
        try:
            job = self._workers.submit(self._run_sync, slot, flight, True)
        except RuntimeError:  # closed: nobody refreshes any more
            self._abandon(slot, flight)
            return
        self._background.add(job)
        job.add_done_callback(functools.partial(self._finished, slot, flight))

    def _finished(self, slot: Slot[K], flight: Future[Entry], job: Future[None]) -> None:
        self._background.discard(job)
        if job.cancelled():  # dropped from the queue by close()
            self._abandon(slot, flight)

    def _abandon(self, slot: Slot[K], flight: Future[Entry]) -> None:
        """Settle a flight that will never run, so its waiters do not wait for nothing."""
        provider, _ = self._fetcher.describe(slot.key)
        with slot.lock:
            slot.flight = None  # (no other flight can have started: this one was open)
        flight.set_exception(
            ProviderUnavailableError(f"{provider}: the token cache is closed", provider=provider)
        )

    def _slot(self, raw: Hashable) -> Slot[K]:
        slot = self._aliases.get(raw)
        if slot is not None:
            return slot
        key = self._fetcher.resolve(raw)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = Slot(key)
            with slot.lock:
                slot.aliases.add(raw)
                self._aliases[raw] = slot
                if slot.entry is not None:
                    self._hot[raw] = slot.entry
        return slot

    def _decide(self, slot: Slot[K]) -> tuple[Token | None, Future[Entry] | None, bool]:
        """Under the slot lock: serve a token, join a flight, or lead a new one."""
        with slot.lock:
            return slot.decide(self._now())

    def _run_sync(self, slot: Slot[K], flight: Future[Entry], background: bool) -> None:
        started, wall = self._now(), self._clock.time()
        try:
            response = self._fetcher.fetch(slot.key, slot.stale())
        except BaseException as exc:
            self._settle_error(slot, flight, exc, started, background)
            if not isinstance(exc, Exception):
                raise
        else:
            self._settle(slot, flight, response, started, wall, background)

    async def _run_async(self, slot: Slot[K], flight: Future[Entry]) -> None:
        started, wall = self._now(), self._clock.time()
        try:
            response = await self._fetcher.afetch(slot.key, slot.stale())
        except BaseException as exc:
            self._settle_error(slot, flight, exc, started, False)
            if not isinstance(exc, Exception):
                raise
        else:
            self._settle(slot, flight, response, started, wall, False)

    def _settle(
        self,
        slot: Slot[K],
        flight: Future[Entry],
        response: TokenResponse,
        started: float,
        wall: float,
        background: bool,
    ) -> None:
        timing = self._fetcher.timing(slot.key)
        lifetime = response.lifetime
        duration = self._now() - started  # this fetch's time, before any shift for issued_at
        entry = schedule(response, timing, started, wall, self._now())
        with slot.lock:
            self._install(slot, entry)
            slot.succeeded(entry)
        flight.set_result(entry)
        provider, key = self._fetcher.describe(slot.key)
        logger.info(
            "token acquired provider=%s %s expires_in=%.0f background=%s duration_ms=%.1f",
            provider,
            key,
            lifetime,
            background,
            duration * 1000,
        )
        self._events.emit(TokenAcquired(provider, key, background, duration, lifetime))

    def _settle_error(
        self,
        slot: Slot[K],
        flight: Future[Entry],
        exc: BaseException,
        started: float,
        background: bool,
    ) -> None:
        provider, key = self._fetcher.describe(slot.key)
        if not isinstance(exc, Exception):  # cancelled or interrupted: not the provider's fault
            with slot.lock:
                slot.flight = None
            flight.set_exception(
                ProviderUnavailableError(f"{provider}: token fetch interrupted", provider=provider)
            )
            return
        now = self._now()
        with slot.lock:
            slot.failed(exc, now, self._rng)
        flight.set_exception(exc)
        code = exc.code if isinstance(exc, ProviderError) else "internal_error"
        logger.warning(
            "token request failed provider=%s %s error=%s background=%s",
            provider,
            key,
            type(exc).__name__,
            background,
        )
        self._events.emit(
            TokenRequestFailed(provider, key, background, now - started, type(exc).__name__, code)
        )

    def _install(self, slot: Slot[K], entry: Entry | None) -> None:
        """Publish ``entry`` under every alias (caller holds ``slot.lock``)."""
        slot.entry = entry
        for alias in slot.aliases:
            if entry is None:
                self._hot.pop(alias, None)
            else:
                self._hot[alias] = entry

    def _stuck(self, slot: Slot[K]) -> ProviderUnavailableError:
        provider, _ = self._fetcher.describe(slot.key)
        return ProviderUnavailableError(
            f"{provider}: gave up waiting for the token fetch", provider=provider
        )
