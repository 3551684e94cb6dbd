"""Sending a grant's request: one retry policy, two tiny drivers (STYLE 4).

:func:`token_flow` is the whole policy as a generator — it yields either an
:class:`httpx.Request` to send or a :class:`Sleep`, and is sent back a
:class:`~tokenbroker.grants.Reply` or the transport exception. It retries what
is retryable (5xx, 429, network errors, timeouts, malformed replies) with
exponential backoff and full jitter, honours ``Retry-After``, and never runs
past one overall deadline. :func:`send_sync` and :func:`send_async` only do the
I/O; neither contains policy.

The exchange ends in an :class:`Exchange` record, never in a raised error: what the
refresh protocol must know about a failure (how many sends the provider may have
processed, the body of a 2xx reply without a usable token — possibly a rotated
refresh token) travels in that record, and the error callers receive
(:meth:`Exchange.result`) carries none of it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Generator
from dataclasses import dataclass

import httpx

from .errors import ProviderError, ProviderUnavailableError
from .grants import Grant, Reply, TokenResponse

__all__ = ["Exchange", "RetryPolicy", "Sleep", "send_async", "send_sync", "token_flow"]

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


Outcome = Reply | Exception | None
Flow = Generator[httpx.Request | Sleep, Outcome, Exchange]


def token_flow(grant: Grant, policy: RetryPolicy, rng: random.Random | None = None) -> Flow:
    """The retry policy for one token exchange.

    Args:
        grant: Builds each attempt's request and parses the reply.
        policy: Retries, timeouts, deadline, backoff.
        rng: Source of jitter (injected by tests).

    Returns:
        A generator; its return value is the :class:`Exchange`: the token response, or the
        last classified failure once retries or the deadline run out.
    """
    jitter = rng or random.Random()  # noqa: S311 - jitter, not security
    started = time.monotonic()
    give_up_at = started + policy.deadline
    attempt = doubtful = 0
    unusable: bytes | None = None
    while True:
        attempt += 1
        request = grant.build_request()
        request.extensions["tokenbroker.provider"] = grant.provider
        remaining = give_up_at - time.monotonic()
        request.extensions["timeout"] = httpx.Timeout(
            max(0.001, min(policy.timeout, remaining))
        ).as_dict()
        request.extensions["tokenbroker.attempt_deadline"] = time.monotonic() + min(
            policy.timeout, remaining
        )
        issued_at = time.time()
        outcome = yield request
        try:
            if isinstance(outcome, Exception):
                raise _translate(outcome, grant.provider, request.url)
            if outcome is None:
                raise ProviderUnavailableError(
                    f"{grant.provider}: no reply", provider=grant.provider
                )
            return Exchange(response=grant.parse_response(outcome, issued_at))
        except ProviderError as caught:
            error = _detached(caught)
        sent = getattr(error, "sent", False)
        doubtful += 1 if sent else 0
        if isinstance(outcome, Reply) and 200 <= outcome.status_code < 300:
            unusable = outcome.content[:_KEPT_REPLY_BYTES]  # the latest such reply
        failed = Exchange(error=error, doubtful_sends=doubtful, unusable_reply=unusable)
        if not error.retryable or attempt > policy.retries:
            return failed
        if sent and policy.max_resends is not None and doubtful > policy.max_resends:
            return failed
        cap = min(_MAX_BACKOFF, policy.backoff * 2 ** (attempt - 1))
        delay = jitter.uniform(0, cap)
        told = getattr(error, "retry_after", None)
        if told is not None:
            delay = max(delay, told)
        if time.monotonic() + delay >= give_up_at:
            return failed
        yield Sleep(delay)


def _detached(error: ProviderError) -> ProviderError:
    """The error without traceback or chain, both of which could hold the reply's bytes
    (frame locals; a ``JSONDecodeError.doc`` or an httpx response down the chain)."""
    error.__cause__ = error.__context__ = None
    error.__suppress_context__ = True
    return error.with_traceback(None)


def _translate(exc: Exception, provider: str, url: httpx.URL) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    # Scheme, host, port and path only: a query string or user info may carry a secret.
    where = str(url.copy_with(query=None, fragment=None, username=None, password=None))
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ProviderUnavailableError(
            f"{provider}: could not connect to {where}", provider=provider, sent=False
        )
    if isinstance(exc, httpx.TimeoutException):
        return ProviderUnavailableError(f"{provider}: {where} timed out", provider=provider)
    return ProviderUnavailableError(
        f"{provider}: transport error ({type(exc).__name__}) from {where}", provider=provider
    )


def _too_large(provider: str) -> ProviderUnavailableError:
    return ProviderUnavailableError(f"{provider}: reply exceeds the size limit", provider=provider)


def _slow(provider: str) -> ProviderUnavailableError:
    return ProviderUnavailableError(f"{provider}: reply too slow", provider=provider)


def send_sync(client: httpx.Client, flow: Flow, max_bytes: int) -> Exchange:
    """Drive ``flow`` with a blocking client.

    Args:
        client: The HTTP client (never follows redirects).
        flow: From :func:`token_flow`.
        max_bytes: Body size cap.

    Returns:
        The flow's :class:`Exchange`.
    """
    item = next(flow)
    while True:
        try:
            if isinstance(item, Sleep):
                time.sleep(item.seconds)
                item = flow.send(None)
                continue
            try:
                outcome: Outcome = _read_sync(client, item, max_bytes)
            except (httpx.HTTPError, ProviderError) as exc:
                outcome = exc
            item = flow.send(outcome)
        except StopIteration as stop:
            result: Exchange = stop.value
            return result


class _Body:
    """Collects a reply body, refusing it past the size cap or the attempt's deadline."""

    def __init__(self, request: httpx.Request, max_bytes: int) -> None:
        self._provider = _provider(request)
        self._deadline = request.extensions["tokenbroker.attempt_deadline"]
        self._max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max_bytes:
            raise _too_large(self._provider)
        if time.monotonic() > self._deadline:
            raise _slow(self._provider)
        self._chunks.append(chunk)

    def reply(self, response: httpx.Response) -> Reply:
        return Reply(response.status_code, response.headers, b"".join(self._chunks))


def _read_sync(client: httpx.Client, request: httpx.Request, max_bytes: int) -> Reply:
    body = _Body(request, max_bytes)
    response = client.send(request, stream=True)
    try:
        for chunk in response.iter_bytes():
            body.add(chunk)
        return body.reply(response)
    finally:
        response.close()


async def send_async(client: httpx.AsyncClient, flow: Flow, max_bytes: int) -> Exchange:
    """Drive ``flow`` with an async client; the same policy as :func:`send_sync`.

    Args:
        client: The async HTTP client (never follows redirects).
        flow: From :func:`token_flow`.
        max_bytes: Body size cap.

    Returns:
        The flow's :class:`Exchange`.
    """
    item = next(flow)
    while True:
        try:
            if isinstance(item, Sleep):
                await asyncio.sleep(item.seconds)
                item = flow.send(None)
                continue
            try:
                budget = item.extensions["tokenbroker.attempt_deadline"] - time.monotonic()
                async with asyncio.timeout(max(0.001, budget)):
                    outcome: Outcome = await _read_async(client, item, max_bytes)
            except TimeoutError:
                outcome = _slow(_provider(item))
            except (httpx.HTTPError, ProviderError) as exc:
                outcome = exc
            item = flow.send(outcome)
        except StopIteration as stop:
            result: Exchange = stop.value
            return result


async def _read_async(client: httpx.AsyncClient, request: httpx.Request, max_bytes: int) -> Reply:
    body = _Body(request, max_bytes)
    response = await client.send(request, stream=True)
    try:
        async for chunk in response.aiter_bytes():
            body.add(chunk)
        return body.reply(response)
    finally:
        await response.aclose()


def _provider(request: httpx.Request) -> str:
    provider: str = request.extensions.get("tokenbroker.provider", "provider")
    return provider
