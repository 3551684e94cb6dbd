"""Progress: weighted phases, a value that never goes backwards, and a rate limit on events.

Each job kind declares its phases in order with a weight each (:class:`PhasePlan`); the
weights are scaled to sum to 100. While a job is in phase *k* with *done* of *total* items
of that phase finished::

    progress = Σ weights of phases before k  +  weight of k * done / total

:class:`ProgressTracker` clamps that value so it never goes backwards (a resumed job starts
from its stored progress) and reaches 100 only when the job ends. :class:`ProgressCoalescer`
lets at most ``max_per_second`` updates per job through, reading time from an injected
:class:`~tokenbroker.core.clock.Clock`; a phase change and the final update always pass, and
the latest held-back update is kept for :meth:`ProgressCoalescer.flush`. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from tokenbroker.core.clock import Clock

__all__ = ["Phase", "PhasePlan", "ProgressCoalescer", "ProgressTracker"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Phase:
    """One phase of a job kind.

    Attributes:
        name: Its name as events show it (``resolve``, ``fetch``, ``verify``).
        weight: Its share of the whole, relative to the other phases' weights (> 0).
    """

    name: str
    weight: float


class PhasePlan:
    """A kind's phases in order, weights scaled to sum to 100.

    Args:
        phases: ``(name, weight)`` pairs or :class:`Phase` records, in the order they run.

    Raises:
        ValueError: For no phases, a repeated name, or a weight that is not positive.
    """

    __slots__ = ("_index", "_phases", "_starts")

    def __init__(self, phases: Iterable[Phase | tuple[str, float]]) -> None:
        given = [p if isinstance(p, Phase) else Phase(*p) for p in phases]
        if not given:
            raise ValueError("a job kind needs at least one phase")
        names = [p.name for p in given]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique: {names}")
        if any(not p.weight > 0 for p in given):
            raise ValueError("phase weights must be positive")
        total = sum(p.weight for p in given)
        self._phases = tuple(Phase(p.name, 100.0 * p.weight / total) for p in given)
        self._index = {p.name: i for i, p in enumerate(self._phases)}
        starts, reached = [], 0.0
        for p in self._phases:
            starts.append(reached)
            reached += p.weight
        self._starts = tuple(starts)

    @property
    def phases(self) -> tuple[Phase, ...]:
        """The phases in order, each weight scaled so that they sum to 100."""
        return self._phases

    def index(self, phase: str) -> int:
        """The phase's position (0 for the first).

        Raises:
            ValueError: For a phase the plan does not declare.
        """
        try:
            return self._index[phase]
        except KeyError:
            raise ValueError(f"unknown phase {phase!r}; phases: {list(self._index)}") from None

    def progress(self, phase: str, done: int, total: int) -> float:
        """The weighted progress at ``done`` of ``total`` items of ``phase``.

        Args:
            phase: The current phase.
            done: Items of the phase finished (clamped to 0..total).
            total: Items in the phase; 0 or less counts as nothing done yet.

        Returns:
            A value in 0-100 (below 100 until the last phase's items are all done).

        Raises:
            ValueError: For an unknown phase.
        """
        i = self.index(phase)
        ratio = min(max(done, 0), total) / total if total > 0 else 0.0
        return min(100.0, self._starts[i] + self._phases[i].weight * ratio)

    def __repr__(self) -> str:
        inner = ", ".join(f"{p.name}={p.weight:g}" for p in self._phases)
        return f"PhasePlan({inner})"


class ProgressTracker:
    """One job's progress: weighted by its plan, never going backwards.

    Args:
        plan: The kind's phases.
        floor: The progress already reached (a resumed job's stored value), 0-100.

    Raises:
        ValueError: For a floor outside 0-100.
    """

    __slots__ = ("_phase", "_plan", "_progress")

    def __init__(self, plan: PhasePlan, floor: float = 0.0) -> None:
        if not 0.0 <= floor <= 100.0:
            raise ValueError(f"progress must be within 0-100, not {floor}")
        self._plan = plan
        self._progress = float(floor)
        self._phase: str | None = None

    @property
    def progress(self) -> float:
        """The highest progress reached so far."""
        return self._progress

    @property
    def phase(self) -> str | None:
        """The current phase, None before the first update."""
        return self._phase

    def update(self, phase: str, done: int, total: int) -> float:
        """Record the current phase's counts.

        Args:
            phase: The current phase; the same as before or a later one.
            done: Items of the phase finished.
            total: Items in the phase.

        Returns:
            The new progress: the weighted value, or the previous one if that was higher.

        Raises:
            ValueError: For an unknown phase, or one earlier than the current phase.
        """
        index = self._plan.index(phase)
        if self._phase is not None and index < self._plan.index(self._phase):
            raise ValueError(f"phase {phase!r} comes before the current phase {self._phase!r}")
        self._phase = phase
        self._progress = max(self._progress, self._plan.progress(phase, done, total))
        return self._progress

    def finish(self) -> float:
        """Mark the work ended: progress 100 (for ``done`` and ``partial`` jobs)."""
        self._progress = 100.0
        return self._progress

    def __repr__(self) -> str:
        return f"ProgressTracker(phase={self._phase!r}, progress={self._progress:.2f})"


class ProgressCoalescer(Generic[T]):
    """At most ``max_per_second`` progress updates per job; phase changes and the end always.

    An update that comes too soon after the last one let through is held (only the latest
    is kept); :meth:`flush` lets it through once its time has come. The caller calls
    :meth:`flush` on a timer (e.g. with the heartbeat), so the last state of a job that goes
    quiet still gets out. Not thread-safe: one coalescer belongs to one event loop.

    Args:
        clock: Where time comes from (``monotonic()`` only).
        max_per_second: Updates per second per job that may pass (> 0).

    Raises:
        ValueError: For a rate that is not positive.
    """

    __slots__ = ("_clock", "_held", "_interval", "_last", "_phase")

    def __init__(self, clock: Clock, max_per_second: float = 4.0) -> None:
        if not max_per_second > 0:
            raise ValueError("max_per_second must be positive")
        self._clock = clock
        self._interval = 1.0 / max_per_second
        self._last: dict[str, float] = {}
        self._phase: dict[str, str] = {}
        self._held: dict[str, T] = {}

    def offer(self, job_id: str, update: T, *, phase: str, final: bool = False) -> T | None:
        """Decide whether ``update`` goes out now.

        Args:
            job_id: The job it belongs to.
            update: The update (any value; returned as given).
            phase: The job's phase in the update; a change from the last offer always passes.
            final: True for the job's last update: it passes, and the job is forgotten.

        Returns:
            ``update`` when it should be sent now (any held one is then dropped, being
            older); None when it was held back.
        """
        now = self._clock.monotonic()
        changed = self._phase.get(job_id) != phase
        if final:
            self.forget(job_id)
            return update
        self._phase[job_id] = phase
        last = self._last.get(job_id)
        if changed or last is None or now - last >= self._interval:
            self._last[job_id] = now
            self._held.pop(job_id, None)
            return update
        self._held[job_id] = update
        return None

    def flush(self, job_id: str) -> T | None:
        """The held-back update of ``job_id``, if there is one and its time has come."""
        last = self._last.get(job_id)
        if job_id not in self._held or last is None:
            return None
        now = self._clock.monotonic()
        if now - last < self._interval:
            return None
        self._last[job_id] = now
        return self._held.pop(job_id)

    def forget(self, job_id: str) -> None:
        """Drop everything kept for ``job_id`` (its job ended or moved elsewhere)."""
        self._last.pop(job_id, None)
        self._phase.pop(job_id, None)
        self._held.pop(job_id, None)

    def __len__(self) -> int:
        """How many jobs the coalescer keeps state for."""
        return len(self._last)

    def __repr__(self) -> str:
        return f"ProgressCoalescer(jobs={len(self._last)}, per_second={1 / self._interval:g})"
