"""Clocks: the cache reads time only through an injected :class:`Clock`.

Expiry decisions use ``monotonic()`` (immune to wall-clock jumps); the
absolute ``expires_at`` reported to consumers uses ``time()``. Tests use
:class:`ManualClock` and move time forward instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """What the cache needs to know about time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    def time(self) -> float:
        """Seconds since the Unix epoch (wall clock)."""


class SystemClock:
    """The real clocks of this machine."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock that moves only when told to, for tests.

    Args:
        start: The initial wall-clock time (the monotonic reading starts at 0).
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._offset = 0.0
        self._start = start

    def monotonic(self) -> float:
        """Seconds advanced so far."""
        return self._offset

    def time(self) -> float:
        """The start time plus the seconds advanced so far."""
        return self._start + self._offset

    def advance(self, seconds: float) -> None:
        """Move both readings forward.

        Args:
            seconds: How far; must not be negative.

        Raises:
            ValueError: For a negative step.
        """
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._offset += seconds

    def __repr__(self) -> str:
        return f"ManualClock(monotonic={self._offset})"
