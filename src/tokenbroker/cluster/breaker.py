"""The circuit breaker in front of Redis: after failures, stop calling it for a cool-down.

States (an explicit state machine, STYLE 6):

* ``closed`` — calls go through; ``threshold`` failures in a row open the breaker.
* ``open`` — calls are refused at once (the caller falls back to the store or to its own
  counts) until ``cooldown`` seconds have passed; then the next call is a probe.
* ``half_open`` — one probe is allowed through: success closes the breaker, failure
  opens it for another cool-down.

Opening logs ONE warning (with the reason: an error class, never a URL or a password), and
closing again logs one line, so a Redis outage costs two log lines, not one per request.
"""

from __future__ import annotations

import enum
import logging
import threading

from ..core.clock import Clock, SystemClock

__all__ = ["Breaker", "BreakerState"]

logger = logging.getLogger("tokenbroker.cluster")


class BreakerState(enum.Enum):
    """Where the breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Decides whether to call Redis, from the outcomes of earlier calls.

    Args:
        threshold: Failures in a row that open the breaker.
        cooldown: Seconds it stays open before a probe.
        clock: Monotonic time source (tests pass a :class:`~tokenbroker.core.clock.ManualClock`).
        component: The name used in the log lines and in :attr:`reason`.
    """

    def __init__(
        self,
        *,
        threshold: int = 2,
        cooldown: float = 2.0,
        clock: Clock | None = None,
        component: str = "redis",
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.component = component
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._reason: str | None = None

    def __repr__(self) -> str:
        return f"Breaker(state={self._state.value}, failures={self._failures})"

    @property
    def state(self) -> BreakerState:
        """The current state."""
        return self._state

    @property
    def reason(self) -> str | None:
        """Why the breaker is not closed (e.g. ``redis unreachable: TimeoutError``), or None."""
        return self._reason if self._state is not BreakerState.CLOSED else None

    def allow(self) -> bool:
        """Whether a call may go to Redis now; in ``open`` past the cool-down, the caller
        becomes the one probe (``half_open``) and later callers are refused until it ends."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if self._clock.monotonic() - self._opened_at >= self.cooldown:
                    self._state = BreakerState.HALF_OPEN
                    return True
                return False
            return False  # a probe is under way

    def succeeded(self) -> None:
        """Record a call that Redis answered; closes the breaker."""
        with self._lock:
            recovered = self._state is not BreakerState.CLOSED
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._reason = None
        if recovered:
            logger.warning("%s answers again; cluster coordination restored", self.component)

    def failed(self, error: BaseException) -> None:
        """Record a failed call (timeout, refused, reset); may open the breaker.

        Args:
            error: What went wrong; only its class name is kept and logged.
        """
        reason = f"{self.component} unreachable: {type(error).__name__}"
        with self._lock:
            self._failures += 1
            was = self._state
            if was is BreakerState.HALF_OPEN or (
                was is BreakerState.CLOSED and self._failures >= self.threshold
            ):
                self._state = BreakerState.OPEN
                self._opened_at = self._clock.monotonic()
                self._reason = reason
            opened = was is BreakerState.CLOSED and self._state is BreakerState.OPEN
        if opened:
            logger.warning(
                "%s; serving on the store alone (slower coalescing, per-process limits)", reason
            )
