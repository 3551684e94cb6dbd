"""The access token handed to consumers: never a refresh token, never in a repr."""

from __future__ import annotations

from dataclasses import dataclass

from .clock import Clock, SystemClock

__all__ = ["Token"]

_SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True, slots=True, repr=False)
class Token:
    """An access token and what a consumer needs to use it.

    Attributes:
        access_token: The bearer value to send upstream.
        token_type: ``Bearer`` (normalised) or the provider's type.
        expires_at: When the provider says it expires, Unix seconds.
        scope: The granted scope string, if the provider said.
    """

    access_token: str
    token_type: str
    expires_at: float
    scope: str | None = None

    @property
    def expires_in(self) -> int:
        """Whole seconds left before ``expires_at`` (0 when past), by the system wall clock."""
        return self.seconds_left(_SYSTEM_CLOCK)

    def seconds_left(self, clock: Clock) -> int:
        """Whole seconds left before ``expires_at`` (0 when past), by ``clock``'s wall time.

        Args:
            clock: The clock to read (a broker's own, or a test's :class:`ManualClock`).

        Returns:
            ``expires_at - clock.time()`` rounded down, at least 0.
        """
        return max(0, int(self.expires_at - clock.time()))

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value, e.g. ``Bearer abc``."""
        return f"{self.token_type} {self.access_token}"

    def __repr__(self) -> str:
        return (
            f"Token(token_type={self.token_type!r}, expires_at={self.expires_at:.0f}, "
            f"scope={self.scope!r}, access_token='**********')"
        )

    __str__ = __repr__
