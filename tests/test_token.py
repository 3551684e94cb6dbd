"""A Token's remaining life is read from the clock it is given (the property from the system's)."""

from __future__ import annotations

import time

from tokenbroker.core.clock import ManualClock
from tokenbroker.core.token import Token


def test_seconds_left_follows_the_given_clock() -> None:
    """``seconds_left`` counts down as a ManualClock advances and stops at 0; ``expires_in``
    reads the system clock."""
    clock = ManualClock()
    token = Token("at", "Bearer", clock.time() + 100)
    assert token.seconds_left(clock) == 100
    clock.advance(60.5)
    assert token.seconds_left(clock) == 39
    clock.advance(100)
    assert token.seconds_left(clock) == 0
    assert token.expires_in == 0  # the ManualClock's start is in the system clock's past
    assert Token("at", "Bearer", time.time() + 100).expires_in in (99, 100)
