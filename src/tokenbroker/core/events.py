"""Events the core emits; outer layers (logs, metrics, the CLI) subscribe.

Events carry names, scopes, durations and error classes — never a token or
a secret — so any subscriber may log or count them freely.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Event",
    "EventBus",
    "LeaseGranted",
    "RefreshTokenRotated",
    "TokenAcquired",
    "TokenInvalidated",
    "TokenRequestFailed",
]

logger = logging.getLogger("tokenbroker.events")


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events.

    Attributes:
        provider: The provider's configured name.
        key: The cache key in words, e.g. ``scope=read`` or ``account=alice``.
    """

    provider: str
    key: str


@dataclass(frozen=True, slots=True)
class TokenAcquired(Event):
    """A new access token was obtained from the provider.

    Attributes:
        background: True when it was a refresh-ahead nobody waited for.
        duration: Seconds the whole exchange (retries included) took.
        expires_in: The token's lifetime in seconds.
    """

    background: bool
    duration: float
    expires_in: float


@dataclass(frozen=True, slots=True)
class TokenRequestFailed(Event):
    """Obtaining a token failed after retries.

    Attributes:
        background: True when a still-valid token keeps being served meanwhile.
        duration: Seconds spent.
        error: The error class name, e.g. ``ProviderUnavailableError``.
        code: The stable error code, e.g. ``provider_unavailable``.
    """

    background: bool
    duration: float
    error: str
    code: str


@dataclass(frozen=True, slots=True)
class TokenInvalidated(Event):
    """A consumer reported the current token rejected and it was dropped."""


@dataclass(frozen=True, slots=True)
class RefreshTokenRotated(Event):
    """The provider issued a new refresh token and it was handed to the store."""


@dataclass(frozen=True, slots=True)
class LeaseGranted(Event):
    """A pool lease got a credential (``key`` is ``account=<name>``).

    Attributes:
        wait: Seconds the acquirer waited in the queue (0 when one was free).
    """

    wait: float


Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out of events to subscribers; a failing subscriber is logged and skipped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(event)`` for every future event.

        Args:
            subscriber: A callable taking one :class:`Event`.

        Returns:
            A function that removes the subscription.
        """
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

        return unsubscribe

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to every subscriber, in subscription order.

        Args:
            event: The event.
        """
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                logger.exception("event subscriber failed on %s", type(event).__name__)
