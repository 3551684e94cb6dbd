"""The retry policy of one token exchange, as a generator that does no I/O (STYLE 3, 4).

:func:`token_flow` is the whole policy — it yields either an :class:`httpx.Request`
to send or a :class:`Sleep`, and is sent back a :class:`~tokenbroker.grants.Reply`
or the classified failure of that send (the driver in :mod:`tokenbroker.grants.send`
translates transport exceptions). It retries what is retryable (5xx, 429, network
errors, timeouts, malformed replies) with exponential backoff and full jitter,
honours ``Retry-After``, and never runs past one overall deadline — measured on the
injected :class:`~tokenbroker.core.clock.Clock`, so tests move a
:class:`~tokenbroker.core.clock.ManualClock` instead of sleeping.

Each attempt ends in one ``tokenbroker.grants`` log line (INFO when it gave a token,
WARNING when not): provider, attempt number, HTTP status, elapsed milliseconds on the
flow's clock, the error class and the delay before the next attempt — never a body.

The exchange ends in an :class:`Exchange` record, never in a raised error: what the
refresh protocol must know about a failure (how many sends the provider may have
processed, the body of a 2xx reply without a usable token — possibly a rotated
refresh token) travels in that record, and the error callers receive
(:meth:`Exchange.result`) carries none of it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Generator
from dataclasses import dataclass

import httpx

from ..core.clock import Clock, SystemClock
from ..errors import ProviderError, ProviderUnavailableError
from .base import Grant, Reply, TokenResponse

__all__ = ["Exchange", "Flow", "Outcome", "RetryPolicy", "Sleep", "token_flow"]

logger = logging.getLogger("tokenbroker.grants")

_MAX_BACKOFF = 30.0
# What is kept of a 2xx reply without a usable token (for the refresh protocol's record).
_KEPT_REPLY_BYTES = 65_536


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try.

    Attributes:
        retries: Extra attempts after the first, for retryable failures.
        timeout: Seconds for one attempt.
        deadline: Seconds for the whole exchange, sleeps included.
        backoff: Base of the exponential backoff (full jitter), in seconds.
        max_response_bytes: Replies larger than this (after decompression) are refused.
        max_resends: How many retries may follow a failure the provider may have processed
            (``sent``); 1 for single-use refresh tokens without a reuse grace, so one is
            presented at most twice (refresh protocol, step 7). None: only ``retries`` limits.
    """

    retries: int = 2
    timeout: float = 10.0
    deadline: float = 30.0
    backoff: float = 0.5
    max_response_bytes: int = 1 << 20
    max_resends: int | None = None


@dataclass(frozen=True, slots=True)
class Sleep:
    """An instruction to the driver: wait this many seconds, then send ``None`` back."""

    seconds: float


@dataclass(frozen=True, slots=True, repr=False)
class Exchange:
    """How one token exchange ended: a token, or a classified failure and its protocol state.

    Attributes:
        response: The token response, when the exchange succeeded.
        error: The last classified failure, when it did not. It holds no reply bytes.
        doubtful_sends: How many requests of the exchange the provider may have processed
            (the refresh protocol decides from it what a single-use token may risk).
        unusable_reply: The latest 2xx body that held no usable token (at most 64 KiB):
            a single-use provider may have rotated in it, so the refresh protocol keeps it
            encrypted on the attempt. Never in a message, a repr or an error.
    """

    response: TokenResponse | None = None
    error: ProviderError | None = None
    doubtful_sends: int = 0
    unusable_reply: bytes | None = None

    def __repr__(self) -> str:
        kept = "none" if self.unusable_reply is None else f"{len(self.unusable_reply)} bytes"
        if self.error is None:
            return f"Exchange(response={self.response!r})"
        return (
            f"Exchange(error={type(self.error).__name__}, doubtful_sends={self.doubtful_sends},"
            f" unusable_reply={kept})"
        )

    def result(self) -> TokenResponse:
        """The token response, or raise the exchange's error.

        Returns:
            The token response.

        Raises:
            ProviderError: The exchange's classified failure.
        """
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


#: What a driver sends back for a request: the reply, or the classified failure of sending it.
Outcome = Reply | ProviderError | None
Flow = Generator[httpx.Request | Sleep, Outcome, Exchange]


def token_flow(
    grant: Grant,
    policy: RetryPolicy,
    rng: random.Random | None = None,
    *,
    clock: Clock | None = None,
) -> Flow:
    """The retry policy for one token exchange.

    Each request carries ``tokenbroker.attempt_deadline``, a ``clock.monotonic()`` reading
    the driver checks the body against, so the driver must be given the same clock.

    Args:
        grant: Builds each attempt's request and parses the reply.
        policy: Retries, timeouts, deadline, backoff.
        rng: Source of jitter (injected by tests).
        clock: Time source for the deadlines and for ``issued_at`` (default: the system's).

    Returns:
        A generator; its return value is the :class:`Exchange`: the token response, or the
        last classified failure once retries or the deadline run out.
    """
    jitter = rng or random.Random()  # noqa: S311 - jitter, not security
    clock = clock or SystemClock()
    started = clock.monotonic()
    give_up_at = started + policy.deadline
    attempt = doubtful = 0
    unusable: bytes | None = None
    while True:
        attempt += 1
        request = grant.build_request()
        request.extensions["tokenbroker.provider"] = grant.provider
        remaining = give_up_at - clock.monotonic()
        request.extensions["timeout"] = httpx.Timeout(
            max(0.001, min(policy.timeout, remaining))
        ).as_dict()
        sent_at = clock.monotonic()
        request.extensions["tokenbroker.attempt_deadline"] = sent_at + min(
            policy.timeout, remaining
        )
        issued_at = clock.time()
        outcome = yield request
        try:
            if isinstance(outcome, ProviderError):
                raise outcome
            if outcome is None:
                raise ProviderUnavailableError(
                    f"{grant.provider}: no reply", provider=grant.provider
                )
            response = grant.parse_response(outcome, issued_at)
        except ProviderError as caught:
            error = _detached(caught)
        else:
            _log_attempt(grant.provider, attempt, outcome, clock.monotonic() - sent_at, None, None)
            return Exchange(response=response)
        sent = getattr(error, "sent", False)
        doubtful += 1 if sent else 0
        if isinstance(outcome, Reply) and 200 <= outcome.status_code < 300:
            unusable = outcome.content[:_KEPT_REPLY_BYTES]  # the latest such reply
        failed = Exchange(error=error, doubtful_sends=doubtful, unusable_reply=unusable)
        resend_spent = sent and policy.max_resends is not None and doubtful > policy.max_resends
        delay: float | None = None
        if error.retryable and attempt <= policy.retries and not resend_spent:
            cap = min(_MAX_BACKOFF, policy.backoff * 2 ** (attempt - 1))
            delay = jitter.uniform(0, cap)
            told = getattr(error, "retry_after", None)
            if told is not None:
                delay = max(delay, told)
            if clock.monotonic() + delay >= give_up_at:
                delay = None  # the deadline would pass while sleeping
        _log_attempt(grant.provider, attempt, outcome, clock.monotonic() - sent_at, error, delay)
        if delay is None:
            return failed
        yield Sleep(delay)


def _log_attempt(
    provider: str,
    attempt: int,
    outcome: Outcome,
    elapsed: float,
    error: ProviderError | None,
    delay: float | None,
) -> None:
    """One line per attempt: provider, attempt, HTTP status (``-`` when none came back),
    elapsed milliseconds, the error's class, and the delay before the next attempt (``none``:
    there is none). Never a body, a header or a URL: those may carry tokens or secrets."""
    if isinstance(outcome, Reply):
        status: int | None = outcome.status_code
    else:
        status = error.status_code if error is not None else None
    elapsed_ms = round(elapsed * 1000, 1)
    next_delay = "none" if delay is None else f"{delay:.3f}s"
    logger.log(
        logging.INFO if error is None else logging.WARNING,
        "token request provider=%s attempt=%d status=%s elapsed_ms=%s outcome=%s next_delay=%s",
        provider,
        attempt,
        "-" if status is None else status,
        elapsed_ms,
        "ok" if error is None else type(error).__name__,
        next_delay,
        extra={"provider": provider, "status": status, "elapsed_ms": elapsed_ms},
    )


def _detached(error: ProviderError) -> ProviderError:
    """The error without traceback or chain, both of which could hold the reply's bytes
    (frame locals; a ``JSONDecodeError.doc`` or an httpx response down the chain)."""
    error.__cause__ = error.__context__ = None
    error.__suppress_context__ = True
    return error.with_traceback(None)
