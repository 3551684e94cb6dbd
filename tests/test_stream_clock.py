"""api/stream_clock.py: one loop timer wakes every stream at its due time, never early."""

from __future__ import annotations

import asyncio
import random

from tokenbroker.api.stream_clock import GRAIN, SLACK, Waker, clock_for, is_due


def test_a_thousand_streams_share_one_timer_and_wake_on_time() -> None:
    """1,000 waiting streams with due times spread over 0.3 s: the loop holds at most one
    armed timer for all of them (asyncio's own timer list, read directly), and each stream
    is woken no earlier than its due time and within a grain (plus scheduling) after."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        clock = clock_for(loop)
        start = loop.time()
        rng = random.Random(7)
        lateness: list[float] = []

        async def stream() -> None:
            waker = Waker(loop)
            due = start + rng.uniform(0.05, 0.3)
            clock.wake_at(waker, due)
            await waker.wait()
            assert is_due(loop.time(), due)
            lateness.append(loop.time() - due)

        tasks = [asyncio.ensure_future(stream()) for _ in range(1000)]
        await asyncio.sleep(0)  # every stream has registered and waits
        timers = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        assert len(timers) == 1, len(timers)
        assert len(clock) == 1000
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert len(clock) == 0
        return lateness

    lateness = asyncio.run(main())
    assert len(lateness) == 1000
    assert min(lateness) >= -SLACK
    assert max(lateness) < GRAIN + 0.5  # rounded up to the grain, then the loop's delay


def test_a_closed_stream_is_not_woken_and_a_wake_without_a_waiter_is_dropped() -> None:
    """A waker closed before its due time is skipped; ``wake`` while nobody waits does
    nothing (the stream re-checks its state before waiting)."""

    async def main() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        clock = clock_for(loop)
        closed, open_ = Waker(loop), Waker(loop)
        closed.wake()  # no waiter: nothing happens
        clock.wake_at(closed, loop.time() + 0.05)
        clock.wake_at(open_, loop.time() + 0.05)
        closed.closed = True
        waiting_closed = asyncio.ensure_future(closed.wait())
        await asyncio.wait_for(open_.wait(), 2)
        await asyncio.sleep(0.1)
        woken = waiting_closed.done()
        waiting_closed.cancel()
        return woken, repr(open_) == "Waker(running)"

    assert asyncio.run(main()) == (False, True)


def test_an_earlier_due_time_rearms_the_timer() -> None:
    """A stream due sooner than the armed timer is still woken on time (the timer moves)."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        clock = clock_for(loop)
        late, early = Waker(loop), Waker(loop)
        clock.wake_at(late, loop.time() + 10)
        start = loop.time()
        clock.wake_at(early, start + 0.05)
        await asyncio.wait_for(early.wait(), 2)
        return loop.time() - start

    assert asyncio.run(main()) < 1
