"""Clocks: the engine reads time only through an injected :class:`Clock`.

The cache, the refresher, the retry flow and its driver, delegation and the broker
client all take a ``clock`` (default :class:`SystemClock`). Expiry decisions and
deadlines use ``monotonic()`` (immune to wall-clock jumps); absolute times handed to
consumers or written into tokens (``expires_at``, ``iat``/``exp``) use ``time()``.
Tests use :class:`ManualClock` and move time forward instead of sleeping; its
:meth:`ManualClock.sleep` can stand in for an injected ``sleep``.
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
    """The real clocks of this machine: ``time.monotonic`` and ``time.time``."""

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

    def sleep(self, seconds: float) -> None:
        """A fake ``time.sleep``: advance the clock instead of waiting.

        Pass it where a component takes an injected ``sleep``, so a wait loop with a
        deadline on this clock ends without real waiting.

        Args:
            seconds: How long the caller asked to sleep; must not be negative.

        Raises:
            ValueError: For a negative duration.
        """
        self.advance(seconds)

    def __repr__(self) -> str:
        return f"ManualClock(monotonic={self._offset})"
