"""Events the core emits; outer layers (logs, metrics, the CLI) subscribe.

Events carry names, scopes, durations and error classes — never a token or
a secret — so any subscriber may log or count them freely.

Job lifecycle events (:class:`JobStarted`, :class:`JobPhaseChanged`,
:class:`JobItemFinished`, :class:`JobFinished`) travel on the same bus: the job runner
publishes them with ``broker.events.emit(...)``; the metrics and the job log lines
(:mod:`tokenbroker.telemetry`) subscribe. They use plain strings for kinds, phases and
statuses because the core does not know the job model. A job's events, in order::

    JobStarted, JobPhaseChanged (first phase), JobItemFinished*, JobPhaseChanged, ...,
    JobFinished

``JobFinished`` may also come without ``JobStarted`` on the same instance (a queued job
canceled, or a reaper ending a job another instance lost).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Event",
    "EventBus",
    "JobEvent",
    "JobFinished",
    "JobItemFinished",
    "JobPhaseChanged",
    "JobStarted",
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


@dataclass(frozen=True, slots=True, kw_only=True)
class JobEvent(Event):
    """Base of a job's lifecycle events (all fields keyword-only).

    Attributes:
        provider: The provider the job works on; ``""`` for a kind that spans every
            provider (``rotate_key``).
        key: Unused by jobs (``""``); kept so job events are :class:`Event` records.
        job_id: The job's id (for logs; never a metric label).
        kind: The job kind (``warm``, ``refresh``, ``rotate_key``, ``keepalive``, ``authorize``).
        elapsed: Seconds since the job started running on this instance (0 before it did).
    """

    provider: str = ""
    key: str = ""
    job_id: str
    kind: str
    elapsed: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStarted(JobEvent):
    """A job moved to ``running`` on this instance.

    Attributes:
        resumed: True when it continues a job whose previous owner was lost (the reaper
            re-queued it) or a retry; False for its first run.
    """

    resumed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class JobPhaseChanged(JobEvent):
    """A running job entered ``phase``.

    Attributes:
        phase: The phase it entered.
        previous: The phase it left (None when ``phase`` is the first).
        previous_duration: Seconds ``previous`` took (None with no previous phase).
    """

    phase: str
    previous: str | None = None
    previous_duration: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobItemFinished(JobEvent):
    """One item of a job ended (after its retries).

    Publish one per item; subscribers count, they do not print (the job's SSE events are
    the coalesced view).

    Attributes:
        phase: The phase the item belongs to.
        item: The item's name (an account, a scope, a row id; never a secret).
        outcome: ``ok`` or ``failed``.
        attempts: How many tries it took (1 when no retry was needed).
        reason: For a failed item, the error code (``invalid_grant``, ``timeout``); else None.
        retryable: For a failed item, whether a retry job may succeed.
    """

    phase: str
    item: str
    outcome: str
    attempts: int = 1
    reason: str | None = None
    retryable: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class JobFinished(JobEvent):
    """A job reached a final status.

    Attributes:
        status: ``done``, ``partial``, ``failed`` or ``canceled``.
        phase: The phase it was in when it ended (None if it never entered one).
        phase_duration: Seconds spent in ``phase`` (None with no phase, or when the
            phase did not run on this instance, e.g. a reaper ending a lost job).
        ok: Items that ended ok.
        failed: Items that failed.
        error_type: For a ``failed`` job that failed as a whole, its ``error.type``
            (``worker_lost``); else None.
    """

    status: str
    phase: str | None = None
    phase_duration: float | None = None
    ok: int = 0
    failed: int = 0
    error_type: str | None = None


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
