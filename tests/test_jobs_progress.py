"""Progress: weighted phases, never backwards, at most a few events per second per job."""

from __future__ import annotations

import pytest

from tokenbroker.core.clock import ManualClock
from tokenbroker.jobs.progress import Phase, PhasePlan, ProgressCoalescer, ProgressTracker

WARM = PhasePlan([("resolve", 1), ("fetch", 8), ("verify", 1)])


def test_progress_is_the_weighted_sum_of_phases() -> None:
    """Finished phases count whole, the current one by its done/total ratio; weights scale to 100."""
    assert [p.weight for p in WARM.phases] == [10.0, 80.0, 10.0]
    assert WARM.progress("resolve", 0, 1) == 0.0
    assert WARM.progress("resolve", 1, 1) == 10.0
    assert WARM.progress("fetch", 250, 1000) == pytest.approx(30.0)
    assert WARM.progress("verify", 1, 2) == pytest.approx(95.0)
    assert WARM.progress("verify", 2, 2) == pytest.approx(100.0)
    assert WARM.progress("fetch", 5, 0) == 10.0  # an empty phase has done nothing yet
    assert WARM.progress("fetch", 7, 3) == pytest.approx(90.0)  # done is clamped to total


def test_a_plan_refuses_bad_phases() -> None:
    """No phases, repeated names, non-positive weights and unknown phases are refused."""
    for bad in ([], [("a", 1), ("a", 2)], [("a", 0)], [Phase("a", -1)]):
        with pytest.raises(ValueError):
            PhasePlan(bad)
    with pytest.raises(ValueError, match="unknown phase 'nope'"):
        WARM.progress("nope", 0, 1)


def test_the_tracker_never_goes_backwards() -> None:
    """A lower computed value (a phase total that grew, a resumed job's floor) keeps the high mark;
    phases only move forward; finish gives 100."""
    tracker = ProgressTracker(WARM)
    assert tracker.update("resolve", 1, 1) == 10.0
    assert tracker.update("fetch", 50, 100) == pytest.approx(50.0)
    assert tracker.update("fetch", 50, 200) == pytest.approx(50.0)  # total grew: no step back
    assert tracker.update("fetch", 150, 200) == pytest.approx(70.0)
    with pytest.raises(ValueError, match="before the current phase"):
        tracker.update("resolve", 1, 1)
    seen = [tracker.update("fetch", n, 200) for n in range(0, 201, 7)]
    assert seen == sorted(seen) and tracker.progress >= 70.0
    assert tracker.finish() == 100.0
    resumed = ProgressTracker(WARM, floor=tracker.progress)
    assert resumed.update("resolve", 0, 1) == 100.0
    with pytest.raises(ValueError):
        ProgressTracker(WARM, floor=100.5)


def test_ten_thousand_updates_in_one_second_make_a_few_events() -> None:
    """10,000 item updates spread over 1 s of fake time let at most max_per_second + 1 through."""
    clock = ManualClock()
    coalescer: ProgressCoalescer[int] = ProgressCoalescer(clock, max_per_second=4)
    passed = []
    for n in range(10_000):
        if coalescer.offer("j1", n, phase="fetch") is not None:
            passed.append(n)
        clock.advance(1 / 10_000)
    assert 1 <= len(passed) <= 5
    assert passed[0] == 0


def test_phase_changes_and_the_final_update_always_pass() -> None:
    """Without time moving, a new phase and the final event go through; repeats do not."""
    clock = ManualClock()
    coalescer: ProgressCoalescer[str] = ProgressCoalescer(clock, max_per_second=2)
    assert coalescer.offer("j1", "r1", phase="resolve") == "r1"
    assert coalescer.offer("j1", "r2", phase="resolve") is None
    assert coalescer.offer("j1", "f1", phase="fetch") == "f1"
    assert coalescer.offer("j1", "f2", phase="fetch") is None
    assert coalescer.offer("j1", "end", phase="fetch", final=True) == "end"
    assert len(coalescer) == 0  # the job is forgotten
    assert coalescer.flush("j1") is None  # and its held update with it


def test_jobs_are_limited_separately() -> None:
    """One busy job does not use up another job's allowance."""
    clock = ManualClock()
    coalescer: ProgressCoalescer[int] = ProgressCoalescer(clock, max_per_second=1)
    assert coalescer.offer("a", 1, phase="p") == 1
    assert coalescer.offer("b", 1, phase="p") == 1
    assert coalescer.offer("a", 2, phase="p") is None
    clock.advance(1.0)
    assert coalescer.offer("a", 3, phase="p") == 3


def test_a_held_update_is_flushed_once_its_time_comes() -> None:
    """The latest held-back update (only it) comes out of flush after the interval, once."""
    clock = ManualClock()
    coalescer: ProgressCoalescer[int] = ProgressCoalescer(clock, max_per_second=4)
    assert coalescer.offer("j1", 1, phase="p") == 1
    assert coalescer.offer("j1", 2, phase="p") is None
    assert coalescer.offer("j1", 3, phase="p") is None
    assert coalescer.flush("j1") is None  # too soon
    clock.advance(0.25)
    assert coalescer.flush("j1") == 3
    assert coalescer.flush("j1") is None
    with pytest.raises(ValueError):
        ProgressCoalescer(clock, max_per_second=0)
