"""TokenCache: single flight, refresh-ahead, skew, backoff and compare-and-invalidate, on a manual clock."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Hashable

import pytest

from support import stampede
from tokenbroker import (
    ManualClock,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    Timing,
    Token,
    TokenAcquired,
    TokenCache,
    TokenRequestFailed,
    UnknownProviderError,
)
from tokenbroker.core.events import Event, EventBus
from tokenbroker.grants import TokenResponse


class ScriptedFetcher:
    """A real Fetcher whose fetches count themselves, can be held open, and can fail on cue."""

    def __init__(self, lifetime: float = 100.0, timing: Timing | None = None) -> None:
        self.lifetime = lifetime
        self.timing_value = timing or Timing(skew=10.0, refresh_ahead=0.8, deadline=5.0)
        self.calls = 0
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.failures: list[Exception] = []

    def resolve(self, raw: Hashable) -> str:
        if raw == "unknown":
            raise UnknownProviderError("unknown provider 'unknown'")
        return str(raw).strip()

    def describe(self, key: str) -> tuple[str, str]:
        return key, ""

    def timing(self, key: str) -> Timing:
        return self.timing_value

    def _next(self) -> TokenResponse:
        with self.lock:
            self.calls += 1
            number = self.calls
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        token = Token(access_token=f"token-{number}", token_type="Bearer", expires_at=0.0)
        return TokenResponse(token=token, lifetime=self.lifetime)

    def fetch(self, key: str, stale: str | None) -> TokenResponse:
        self.entered.set()
        assert self.gate.wait(10)
        return self._next()

    async def afetch(self, key: str, stale: str | None) -> TokenResponse:
        self.entered.set()
        while not self.gate.is_set():
            await asyncio.sleep(0.001)
        return self._next()


def make(
    lifetime: float = 100.0, **timing: float
) -> tuple[TokenCache[str], ScriptedFetcher, ManualClock]:
    clock = ManualClock()
    fetcher = ScriptedFetcher(lifetime, Timing(**timing) if timing else None)
    return TokenCache(fetcher, clock=clock), fetcher, clock


def held_stampede(cache: TokenCache[str], fetcher: ScriptedFetcher, count: int) -> list[object]:
    """Run `count` threads on one key while the single fetch is held open until all have started."""
    fetcher.gate.clear()
    fetcher.entered.clear()
    started = threading.Semaphore(0)

    def call() -> Token:
        started.release()
        return cache.get("k")

    releaser = threading.Thread(
        target=lambda: [started.acquire() for _ in range(count)] and fetcher.gate.set()
    )
    releaser.start()
    results = stampede(count, call)
    releaser.join(10)
    return results


def test_thousand_threads_on_cold_key_cause_one_fetch() -> None:
    """1000 threads asking for a cold key get one token from exactly one fetch."""
    cache, fetcher, _ = make()
    results = held_stampede(cache, fetcher, 1000)
    assert fetcher.calls == 1
    assert {r.access_token for r in results} == {"token-1"}  # type: ignore[union-attr]


def test_thousand_threads_on_expired_key_cause_one_fetch() -> None:
    """Once a token is inside the skew window, 1000 threads cause exactly one new fetch."""
    cache, fetcher, clock = make()
    cache.get("k")
    clock.advance(95)  # lifetime 100, skew 10: past the hard limit
    results = held_stampede(cache, fetcher, 1000)
    assert fetcher.calls == 2
    assert {r.access_token for r in results} == {"token-2"}  # type: ignore[union-attr]


def test_thousand_tasks_on_cold_and_expired_key_cause_one_fetch_each() -> None:
    """1000 asyncio tasks on a cold key, then on an expired key, cause one fetch each time."""
    cache, fetcher, clock = make()

    async def main() -> tuple[set[str], set[str]]:
        fetcher.gate.clear()
        tasks = [asyncio.ensure_future(cache.aget("k")) for _ in range(1000)]
        await asyncio.sleep(0)
        fetcher.gate.set()
        first = {t.access_token for t in await asyncio.gather(*tasks)}
        clock.advance(95)
        fetcher.gate.clear()
        tasks = [asyncio.ensure_future(cache.aget("k")) for _ in range(1000)]
        await asyncio.sleep(0)
        fetcher.gate.set()
        second = {t.access_token for t in await asyncio.gather(*tasks)}
        return first, second

    first, second = asyncio.run(main())
    assert fetcher.calls == 2
    assert first == {"token-1"}
    assert second == {"token-2"}


def test_threads_and_tasks_share_one_flight() -> None:
    """Threads and asyncio tasks arriving together on a cold key share a single fetch."""
    cache, fetcher, _ = make()
    fetcher.gate.clear()
    thread_results: list[Token] = []
    threads = [
        threading.Thread(target=lambda: thread_results.append(cache.get("k"))) for _ in range(50)
    ]
    for t in threads:
        t.start()
    assert fetcher.entered.wait(5)

    async def main() -> list[Token]:
        tasks = [asyncio.ensure_future(cache.aget("k")) for _ in range(50)]
        await asyncio.sleep(0)
        fetcher.gate.set()
        return list(await asyncio.gather(*tasks))

    task_results = asyncio.run(main())
    for t in threads:
        t.join(10)
    assert fetcher.calls == 1
    assert {t.access_token for t in thread_results + task_results} == {"token-1"}


def test_refresh_ahead_serves_current_token_while_one_background_fetch_runs() -> None:
    """Past refresh_ahead, callers get the current token at once and one background fetch starts."""
    cache, fetcher, clock = make()
    cache.get("k")
    clock.advance(81)  # past 80% of 100 s, before the skew window (90 s)
    fetcher.gate.clear()
    fetcher.entered.clear()
    served = {cache.get("k").access_token for _ in range(100)}
    assert served == {"token-1"}
    assert fetcher.entered.wait(5)
    fetcher.gate.set()
    for _ in range(500):
        if cache.get("k").access_token == "token-2":
            break
        threading.Event().wait(0.01)
    assert cache.get("k").access_token == "token-2"
    assert fetcher.calls == 2


def test_async_refresh_ahead_runs_in_background_task() -> None:
    """An async caller past refresh_ahead gets the current token; one background refresh runs,
    and aclose() waits for it."""
    cache, fetcher, clock = make()

    async def main() -> tuple[str, str]:
        await cache.aget("k")
        clock.advance(85)
        before = (await cache.aget("k")).access_token
        await cache.aclose()
        after = (await cache.aget("k")).access_token
        return before, after

    assert asyncio.run(main()) == ("token-1", "token-2")
    assert fetcher.calls == 2


def test_background_failure_keeps_serving_then_surfaces_error_after_skew() -> None:
    """A failed background refresh leaves the valid token in service; past skew callers get the error."""
    cache, fetcher, clock = make()
    events: list[Event] = []
    cache._events.subscribe(events.append)
    cache.get("k")
    clock.advance(85)
    fetcher.failures = [ProviderUnavailableError("down", provider="k")]
    fetcher.entered.clear()
    assert cache.get("k").access_token == "token-1"
    for _ in range(500):
        if any(isinstance(e, TokenRequestFailed) for e in events):
            break
        threading.Event().wait(0.01)
    assert fetcher.calls == 2
    assert cache.get("k").access_token == "token-1"  # still valid, backoff holds the retry
    assert fetcher.calls == 2
    clock.advance(10)  # 95 s: inside the skew window; the backoff (<= 1 s) has passed
    fetcher.failures = [ProviderUnavailableError("down", provider="k")]
    with pytest.raises(ProviderUnavailableError):
        cache.get("k")
    assert fetcher.calls == 3
    assert [s.state for s in cache.states()] == ["failed"]


def test_failure_is_remembered_with_backoff() -> None:
    """After a failed fetch, callers within the backoff get the same error without a new request."""
    cache, fetcher, clock = make()
    fetcher.failures = [ProviderUnavailableError("down", provider="k", retry_after=30)]
    with pytest.raises(ProviderUnavailableError):
        cache.get("k")
    for _ in range(20):
        with pytest.raises(ProviderUnavailableError):
            cache.get("k")
    assert fetcher.calls == 1
    clock.advance(30.5)
    assert cache.get("k").access_token == "token-2"
    assert fetcher.calls == 2


def test_reauthorization_error_is_remembered_until_reset() -> None:
    """A dead refresh token stops all fetching until reset(), however much time passes."""
    cache, fetcher, clock = make()
    fetcher.failures = [ReauthorizationRequiredError("dead", provider="k")]
    with pytest.raises(ReauthorizationRequiredError):
        cache.get("k")
    clock.advance(86400)
    with pytest.raises(ReauthorizationRequiredError):
        cache.get("k")
    assert [s.state for s in cache.states()] == ["reauthorization_required"]
    assert fetcher.calls == 1
    cache.reset("k")
    assert cache.get("k").access_token == "token-2"


def test_retry_in_tells_how_long_a_failure_is_served_without_clearing_it() -> None:
    """retry_in is 0 for an unseen or healthy key, the remaining backoff after a failure
    (reading it asks nothing and clears nothing), 0 once it passed, inf for reauthorization."""
    cache, fetcher, clock = make()
    assert cache.retry_in("k") == 0.0
    fetcher.failures = [ProviderUnavailableError("down", provider="k", retry_after=30)]
    with pytest.raises(ProviderUnavailableError):
        cache.get("k")
    assert 29.0 < cache.retry_in("k") <= 30.0
    clock.advance(10)
    assert 19.0 < cache.retry_in("k") <= 20.0
    with pytest.raises(ProviderUnavailableError):
        cache.get("k")
    assert fetcher.calls == 1
    clock.advance(20.5)
    assert cache.retry_in("k") == 0.0
    assert cache.get("k").access_token == "token-2" and cache.retry_in("k") == 0.0
    cache.reset("k")
    fetcher.failures = [ReauthorizationRequiredError("dead", provider="k")]
    with pytest.raises(ReauthorizationRequiredError):
        cache.get("k")
    assert cache.retry_in("k") == float("inf")


def test_waiters_get_the_winners_error() -> None:
    """When the one fetch fails, every concurrent waiter gets that error and no one fetches again."""
    cache, fetcher, _ = make()
    fetcher.failures = [ProviderUnavailableError("down", provider="k")]
    results = held_stampede(cache, fetcher, 200)
    assert fetcher.calls == 1
    assert all(isinstance(r, ProviderUnavailableError) for r in results)


def test_compare_and_invalidate_with_fifty_callers_refreshes_once() -> None:
    """50 callers reporting the same rejected token cause one refresh; a stale report drops nothing."""
    cache, fetcher, _ = make()
    rejected = cache.get("k").access_token

    def report() -> str:
        cache.invalidate("k", rejected)
        return cache.get("k").access_token

    results = stampede(50, report)
    assert fetcher.calls == 2
    assert set(results) == {"token-2"}
    assert cache.invalidate("k", rejected) is False
    assert cache.get("k").access_token == "token-2"
    assert fetcher.calls == 2


def test_aliases_share_one_slot() -> None:
    """Different spellings of one key (resolved by the fetcher) share one token and one fetch."""
    cache, fetcher, _ = make()
    assert cache.get("k").access_token == cache.get(" k ").access_token
    assert fetcher.calls == 1
    assert cache.invalidate(" k ", "token-1") is True
    assert cache.get("k").access_token == "token-2"


def test_unknown_key_raises_without_fetch() -> None:
    """An unknown key raises UnknownProviderError and never reaches the fetcher."""
    cache, fetcher, _ = make()
    with pytest.raises(UnknownProviderError):
        cache.get("unknown")
    assert fetcher.calls == 0


def test_short_lifetime_still_caches() -> None:
    """A token that lives less than twice the skew is still cached for part of its life."""
    cache, fetcher, clock = make(lifetime=10.0, skew=30.0, refresh_ahead=0.8, deadline=5.0)
    cache.get("k")
    clock.advance(3)
    assert cache.get("k").access_token == "token-1"
    assert fetcher.calls == 1
    clock.advance(3)  # past lifetime - min(skew, lifetime/2) = 5 s
    assert cache.get("k").access_token == "token-2"


def test_refresh_due_refreshes_idle_keys_in_background() -> None:
    """refresh_due() starts one background refresh per key past its refresh-ahead point."""
    cache, fetcher, clock = make()
    events: list[Event] = []
    cache._events.subscribe(events.append)
    cache.get("a")
    cache.get("b")
    assert cache.refresh_due() == 0
    clock.advance(85)
    assert cache.refresh_due() == 2
    for _ in range(500):
        if sum(isinstance(e, TokenAcquired) and e.background for e in events) == 2:
            break
        threading.Event().wait(0.01)
    assert fetcher.calls == 4
    assert cache.refresh_due() == 0


def test_queued_refreshes_keep_serving_and_close_drops_them() -> None:
    """With one refresh worker, due keys queue behind a held refresh and keep serving their
    token without waiting; close() drops the queued ones, the running one still lands."""
    clock = ManualClock()
    fetcher = ScriptedFetcher()
    cache: TokenCache[str] = TokenCache(fetcher, clock=clock, concurrency=1)
    for key in "abc":
        cache.get(key)
    clock.advance(85)
    fetcher.gate.clear()
    fetcher.entered.clear()
    assert cache.refresh_due() == 3
    assert fetcher.entered.wait(5)
    assert [cache.get(key).access_token for key in "abc"] == ["token-1", "token-2", "token-3"]
    assert [s.state for s in cache.states()] == ["refreshing"] * 3
    cache.close()
    assert [s.state for s in cache.states()] == ["refreshing", "valid", "valid"]
    assert cache.get("b").access_token == "token-2"  # a refresh it cannot start: still served
    fetcher.gate.set()
    for _ in range(500):
        if cache.get("a").access_token == "token-4":
            break
        threading.Event().wait(0.01)
    assert cache.get("a").access_token == "token-4"
    assert fetcher.calls == 4


def test_prefetch_state_and_usable() -> None:
    """prefetch() fetches a key in the background once, not while it is fresh or in flight;
    state() and usable() report a key without creating or fetching it."""
    cache, fetcher, clock = make()
    assert cache.state("k") is None
    assert not cache.usable("k")
    assert cache.states() == []
    fetcher.gate.clear()
    assert cache.prefetch("k")
    assert not cache.prefetch("k")  # in flight
    state = cache.state("k")
    assert state is not None and state.state == "refreshing"
    assert not cache.usable("k")
    fetcher.gate.set()
    for _ in range(500):
        if cache.usable("k"):
            break
        threading.Event().wait(0.01)
    assert cache.usable("k")
    assert not cache.prefetch("k")  # fresh
    assert fetcher.calls == 1
    clock.advance(95)  # past the skew window: no longer usable, due again
    assert not cache.usable("k")
    assert cache.prefetch("k")
    assert cache.get("k").access_token == "token-2"
    assert fetcher.calls == 2


def test_cancelled_async_waiter_does_not_cancel_the_flight() -> None:
    """Cancelling one awaiting task leaves the shared fetch running for the others."""
    cache, fetcher, _ = make()

    async def main() -> str:
        fetcher.gate.clear()
        first = asyncio.ensure_future(cache.aget("k"))
        second = asyncio.ensure_future(cache.aget("k"))
        await asyncio.sleep(0.01)
        first.cancel()
        fetcher.gate.set()
        return (await second).access_token

    assert asyncio.run(main()) == "token-1"
    assert fetcher.calls == 1


def test_waiters_left_by_a_shutdown_report_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Stopping the loop while callers wait for a fetch leaves no 'exception was never
    retrieved' errors behind (SIGTERM while pool logins are pending)."""
    cache, fetcher, _ = make()

    async def main() -> None:
        fetcher.gate.clear()
        for _ in range(3):
            asyncio.ensure_future(cache.aget("k"))
        for _ in range(500):
            if fetcher.entered.is_set():
                break
            await asyncio.sleep(0.001)

    asyncio.run(main())  # cancels the waiters and the fetch together
    gc.collect()
    assert fetcher.entered.is_set()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_events_report_acquisitions_without_tokens() -> None:
    """Acquisition events carry durations and lifetimes but never the token."""
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    fetcher = ScriptedFetcher()
    cache: TokenCache[str] = TokenCache(fetcher, clock=ManualClock(), events=bus)
    cache.get("k")
    assert [type(e) for e in seen] == [TokenAcquired]
    assert "token-1" not in repr(seen)
