"""One key's slot in the token cache: its state machine, its timing, and its state in words.

A slot holds at most one access token (an :class:`Entry` with the monotonic times at
which it is due for refresh and at which it may no longer be handed out), at most one
in-flight fetch, and the last failure with its backoff. The
:class:`~tokenbroker.engine.cache.TokenCache` decides under ``Slot.lock`` and fetches
outside it (STYLE 6); this module holds the slot's fields and the rules the cache
applies to them:

* :meth:`Slot.decide` serves the token, joins the flight under way, or opens a new one.

* :func:`schedule` turns a fetched token into an :class:`Entry` (skew, refresh-ahead,
  and the shift for a token another process obtained).
* :meth:`Slot.fail` remembers a failure: exponential backoff with jitter, at least the
  provider's ``Retry-After``; a reauthorization error is remembered for good.
* :meth:`Slot.state` names the state, from best to worst ``valid`` (or ``empty``),
  ``refreshing``, ``stale``, ``failed``, ``reauthorization_required``; :func:`worst`
  picks the worst of several :class:`SlotState` reports and :data:`DEGRADED` lists the
  states a health check reports as degraded.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..core.token import Token
from ..errors import ReauthorizationRequiredError
from ..grants import TokenResponse

__all__ = ["DEGRADED", "Entry", "Slot", "SlotState", "Timing", "schedule", "worst"]

K = TypeVar("K", bound=Hashable)
#: The longest backoff, in seconds, after repeated failures (before jitter).
MAX_BACKOFF = 60.0


@dataclass(frozen=True, slots=True)
class Timing:
    """When a key's tokens are refreshed.

    Attributes:
        skew: Seconds before real expiry after which a token is not handed out.
        refresh_ahead: Fraction of the lifetime after which a background refresh starts.
        deadline: Upper bound, in seconds, of one fetch (waiters give up after it).
        invalidate_cooldown: Seconds after an invalidation dropped a token during which
            further invalidations of the key are refused (the current token stays).
    """

    skew: float = 30.0
    refresh_ahead: float = 0.8
    deadline: float = 30.0
    invalidate_cooldown: float = 0.0


@dataclass(frozen=True, slots=True)
class SlotState:
    """What the cache knows about one key, for status displays.

    Attributes:
        provider: Provider name.
        key: The key in words.
        state: From best to worst: ``valid`` (or ``empty``: never fetched), ``refreshing``
            (a fetch is under way), ``stale`` (the last fetch failed; the current token is
            still handed out), ``failed`` (the last fetch failed; no token to hand out),
            ``reauthorization_required``.
        valid_until: Wall-clock expiry of the current token, if any.
        last_refresh: Wall-clock time of the last successful fetch, if any.
        last_error: Class name of the last failure since then, if any.
    """

    provider: str
    key: str
    state: str
    valid_until: float | None
    last_refresh: float | None
    last_error: str | None

    @property
    def severity(self) -> int:
        """The state's rank: 0 for ``valid`` and ``empty``, up to 4 for
        ``reauthorization_required``."""
        return _SEVERITY.get(self.state, 0)


_SEVERITY = {"valid": 0, "empty": 0, "refreshing": 1, "stale": 2, "failed": 3}
_SEVERITY["reauthorization_required"] = 4
#: The states in which a key needs an operator's attention (a health check says degraded).
DEGRADED = frozenset({"stale", "failed", "reauthorization_required"})


def worst(states: list[SlotState]) -> SlotState:
    """The worst of ``states`` (``valid`` before ``empty`` among the good ones).

    Args:
        states: At least one state.

    Returns:
        The one with the highest severity; the first of them on a tie.
    """
    return max(states, key=lambda s: (s.severity, s.state == "valid"))


@dataclass(frozen=True, slots=True)
class Entry:
    """A token the cache hands out, with its monotonic deadlines.

    Attributes:
        token: The token (its ``expires_at`` is wall-clock).
        refresh_at: From then on, the next caller starts a background refresh.
        hard_expiry: From then on, the token is no longer handed out.
        obtained: Wall-clock time its lifetime counts from (the fetch's start, or when
            another process obtained it).
    """

    token: Token
    refresh_at: float
    hard_expiry: float
    obtained: float


def schedule(
    response: TokenResponse, timing: Timing, started: float, wall: float, now: float
) -> Entry:
    """The entry for a fetched token.

    The lifetime counts from the fetch's start; a token another process obtained
    (``response.issued_at`` set) counts from when it was issued, but never from later
    than ``now`` (waiting for the other process's refresh must not age its token).
    The skew is at most half the lifetime; refresh-ahead falls before the hard expiry.

    Args:
        response: The fetcher's answer.
        timing: The key's timing.
        started: Monotonic time at which the fetch started.
        wall: Wall-clock time at which the fetch started.
        now: Monotonic time now.

    Returns:
        The entry, its token's ``expires_at`` set to the wall-clock expiry.
    """
    lifetime = response.lifetime
    if response.issued_at is not None:  # obtained by another process: count from then
        # Relative to the flight's start, not to now: waiting for the other process's
        # refresh must not age its token (that would make the next refresh early).
        shift = min(response.issued_at - wall, now - started)
        started, wall = started + shift, wall + shift
    skew = min(timing.skew, lifetime / 2)
    hard = started + lifetime - skew
    refresh_at = started + lifetime * timing.refresh_ahead
    if refresh_at >= hard:
        refresh_at = started + (hard - started) * timing.refresh_ahead
    token = dataclasses.replace(response.token, expires_at=wall + lifetime)
    return Entry(token=token, refresh_at=refresh_at, hard_expiry=hard, obtained=wall)


class Slot(Generic[K]):
    """One canonical key's token, flight and failure; every change happens under ``lock``.

    Attributes:
        key: The canonical key.
        lock: Guards every other attribute.
        entry: The current token, if any.
        flight: The fetch under way, if any (its waiters share its result).
        aliases: The callers' keys that resolved to this one.
        error: The last failure since the last success, if any.
        retry_at: Monotonic time before which a caller without a token gets ``error``.
        failures: Failures in a row.
        last_refresh: Wall-clock time of the last successful fetch, if any.
        rejected: The last access token an invalidation dropped, until the next success.
        forced_at: Monotonic time of the last invalidation that dropped a token.
    """

    __slots__ = (
        "aliases",
        "entry",
        "error",
        "failures",
        "flight",
        "forced_at",
        "key",
        "last_refresh",
        "lock",
        "rejected",
        "retry_at",
    )

    def __init__(self, key: K) -> None:
        self.key = key
        self.lock = threading.Lock()
        self.entry: Entry | None = None
        self.flight: Future[Entry] | None = None
        self.aliases: set[Hashable] = set()
        self.error: BaseException | None = None
        self.retry_at = -math.inf
        self.failures = 0
        self.last_refresh: float | None = None
        self.rejected: str | None = None
        self.forced_at = -math.inf

    def __repr__(self) -> str:
        return (
            f"Slot({self.key!r}, token={self.entry is not None}, "
            f"flight={self.flight is not None}, failures={self.failures})"
        )

    def stale(self) -> str | None:
        """The access token a new fetch must replace: the current one, or the last rejected."""
        entry = self.entry
        return entry.token.access_token if entry is not None else self.rejected

    def decide(self, now: float) -> tuple[Token | None, Future[Entry] | None, bool]:
        """What a caller without a fresh hit does at monotonic ``now`` (caller holds ``lock``).

        Returns:
            ``(token, flight, leader)``: a token still within its hard expiry is served (and
            past its refresh point the first caller also leads a new flight, unless one is
            under way or a failure is backing off); otherwise the caller joins the flight
            under way, or leads a new one.

        Raises:
            Exception: The remembered failure, while it backs off (a fresh traceback each time).
        """
        entry = self.entry
        if entry is not None and now < entry.hard_expiry:
            if now >= entry.refresh_at and self.flight is None and now >= self.retry_at:
                return entry.token, self.open_flight(), True
            return entry.token, None, False
        if self.flight is not None:
            return None, self.flight, False
        if self.error is not None and now < self.retry_at:
            # A fresh traceback per raise: re-raising one object would pile every
            # caller's frames onto it for as long as the error is remembered.
            raise self.error.with_traceback(None)
        return None, self.open_flight(), True

    def open_flight(self) -> Future[Entry]:
        """Start the slot's flight; the caller that opened it runs the fetch (holds ``lock``)."""
        flight: Future[Entry] = Future()
        flight.set_running_or_notify_cancel()  # waiters can never cancel it for the others
        self.flight = flight
        return flight

    def state(self, now: float) -> str:
        """The slot's state in words at monotonic time ``now`` (see :class:`SlotState`)."""
        entry, error = self.entry, self.error
        if isinstance(error, ReauthorizationRequiredError):
            return "reauthorization_required"
        if self.flight is not None:
            return "refreshing"
        if entry is not None and now < entry.hard_expiry:
            return "stale" if error is not None else "valid"
        return "failed" if error is not None else "empty"

    def succeeded(self, entry: Entry) -> None:
        """Close the flight after fetching ``entry``; forget the failures and the rejected
        token (the caller holds ``lock`` and has installed ``entry``)."""
        self.flight = None
        self.clear_error()
        self.last_refresh = entry.obtained
        self.rejected = None

    def failed(self, exc: Exception, now: float, rng: random.Random) -> None:
        """Close the flight after ``exc`` at monotonic ``now`` and back off (holding ``lock``).

        Callers without a token get ``exc`` until ``retry_at``: after the n-th failure in a
        row, ``min(60, 2**(n-1))`` seconds times a jitter in [0.5, 1), or the provider's
        ``retry_after`` if longer; never again for a reauthorization error (until reset).
        """
        self.flight = None
        self.failures += 1
        self.error = exc
        if isinstance(exc, ReauthorizationRequiredError):
            self.retry_at = math.inf
        else:
            backoff = min(MAX_BACKOFF, 2.0 ** (self.failures - 1))
            backoff *= rng.uniform(0.5, 1.0)
            told = getattr(exc, "retry_after", None)
            self.retry_at = now + max(backoff, told or 0.0)

    def clear_error(self) -> None:
        """Forget the remembered failure and its backoff (caller holds ``lock``)."""
        self.error, self.retry_at, self.failures = None, -math.inf, 0
