"""The Redis circuit breaker and the in-process coordinator, on a manual clock (no Redis)."""

from __future__ import annotations

import logging
import threading

import pytest

from tokenbroker.cluster import Breaker, BreakerState
from tokenbroker.core.clock import ManualClock
from tokenbroker.engine.coordination import LocalCoordinator


def test_breaker_opens_after_failures_with_one_warning_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two failures open it (one warning, the reason an error class), calls are refused for the
    cool-down, then one probe goes through and its success closes it again."""
    clock = ManualClock()
    breaker = Breaker(threshold=2, cooldown=5.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="tokenbroker.cluster")
    assert breaker.allow()
    breaker.failed(TimeoutError())
    assert breaker.state is BreakerState.CLOSED and breaker.reason is None
    for _ in range(10):
        breaker.failed(TimeoutError())
    assert breaker.state is BreakerState.OPEN
    assert breaker.reason == "redis unreachable: TimeoutError"
    assert [r.getMessage() for r in caplog.records].count(
        "redis unreachable: TimeoutError; serving on the store alone "
        "(slower coalescing, per-process limits)"
    ) == 1
    assert len(caplog.records) == 1
    assert not breaker.allow()
    clock.advance(5.0)
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one probe at a time
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED and breaker.reason is None
    assert breaker.allow()


def test_failed_probe_reopens_for_another_cooldown() -> None:
    """A probe that fails opens the breaker again at once, for a whole new cool-down."""
    clock = ManualClock()
    breaker = Breaker(threshold=2, cooldown=5.0, clock=clock)
    breaker.failed(ConnectionError())
    breaker.failed(ConnectionError())
    clock.advance(5.0)
    assert breaker.allow()
    breaker.failed(ConnectionError())
    assert breaker.state is BreakerState.OPEN
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()


def test_local_watch_keeps_a_notice_published_before_the_wait() -> None:
    """A notice published between registering a watch and waiting on it is not lost, and a
    notice for another topic does not wake it."""
    coordinator = LocalCoordinator()
    with coordinator.watch("credential:a") as watch:
        coordinator.publish("credential:b")
        assert not watch.wait(0.01)
        coordinator.publish("credential:a")
        assert watch.wait(0.0)
        assert not watch.wait(0.01)  # consumed
    coordinator.publish("credential:a")  # nobody watching: nothing kept
    assert repr(coordinator) == "LocalCoordinator(topics=0)"


def test_wake_all_wakes_every_waiting_thread() -> None:
    """After a gap, wake_all wakes every watch on every topic (their owners re-read the store)."""
    coordinator = LocalCoordinator()
    woken: list[bool] = []
    ready = threading.Barrier(4)

    def waiter(topic: str) -> None:
        with coordinator.watch(topic) as watch:
            ready.wait()
            woken.append(watch.wait(5.0))

    threads = [threading.Thread(target=waiter, args=(f"t{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    ready.wait()
    coordinator.wake_all()
    for thread in threads:
        thread.join(5)
    assert woken == [True, True, True]
