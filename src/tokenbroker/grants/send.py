"""The driver that does a token exchange's I/O: sending, size and time caps, transport errors.

It contains no policy: :func:`~tokenbroker.grants.flow.token_flow` decides what to
send, when to sleep and when to stop; :func:`send_sync` only does what it is told.
The broker's async API runs the same driver in a worker thread (the store's calls
block too), so there is no second, async copy of it (STYLE 4). Its clock and its
sleep are injected: the clock must be the flow's (the attempt deadline is a reading
of it), and a test may pass :meth:`~tokenbroker.core.clock.ManualClock.sleep`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from ..core import tracing
from ..core.clock import Clock, SystemClock
from ..errors import ProviderError, ProviderUnavailableError
from .base import Reply
from .flow import Exchange, Flow, Outcome, Sleep

__all__ = ["send_sync", "transport_error"]


def transport_error(exc: httpx.HTTPError, provider: str, where: str) -> ProviderUnavailableError:
    """Classify an httpx failure (the one place this is done).

    Args:
        exc: What httpx raised.
        provider: The provider the request was for.
        where: The peer in words, without secrets (a URL without query or user info,
            or e.g. ``the broker``).

    Returns:
        A :class:`ProviderUnavailableError`; ``sent=False`` when the connection was never
        made (so a single-use refresh token was certainly not presented). Its message
        names the exception type, never its text (which may quote a URL).
    """
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


def send_sync(
    client: httpx.Client,
    flow: Flow,
    max_bytes: int,
    *,
    clock: Clock | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Exchange:
    """Drive ``flow`` with a blocking client.

    Args:
        client: The HTTP client (never follows redirects).
        flow: From :func:`token_flow`.
        max_bytes: Body size cap.
        clock: The clock the flow was given (its attempt deadlines are readings of it);
            default: the system's.
        sleep: Carries out the flow's :class:`Sleep` instructions.

    Returns:
        The flow's :class:`Exchange`.
    """
    clock = clock or SystemClock()
    item = next(flow)
    attempt = 0
    while True:
        try:
            if isinstance(item, Sleep):
                sleep(item.seconds)
                item = flow.send(None)
                continue
            attempt += 1
            attributes: tracing.Attributes = {"provider": _provider(item), "attempt": attempt}
            with tracing.span("tokenbroker.token_request", attributes, kind="client") as span:
                tracing.inject(item.headers)
                outcome: Outcome
                try:
                    outcome = _read_sync(client, item, max_bytes, clock)
                    span.set("http.response.status_code", outcome.status_code)
                except ProviderError as exc:
                    outcome = exc
                except httpx.HTTPError as exc:
                    outcome = transport_error(exc, _provider(item), _where(item.url))
                if isinstance(outcome, Exception):
                    span.fail(outcome)
                try:
                    item = flow.send(outcome)
                except StopIteration as stop:
                    result: Exchange = stop.value
                    return result
                if isinstance(item, Sleep):
                    span.set("retry_delay_s", item.seconds)
        except StopIteration as stop:
            last: Exchange = stop.value
            return last


class _Body:
    """Collects a reply body, refusing it past the size cap or the attempt's deadline."""

    def __init__(self, request: httpx.Request, max_bytes: int, clock: Clock) -> None:
        self._clock = clock
        self._provider = _provider(request)
        self._deadline = request.extensions["tokenbroker.attempt_deadline"]
        self._max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max_bytes:
            raise _too_large(self._provider)
        if self._clock.monotonic() > self._deadline:
            raise _slow(self._provider)
        self._chunks.append(chunk)

    def reply(self, response: httpx.Response) -> Reply:
        return Reply(response.status_code, response.headers, b"".join(self._chunks))


def _read_sync(client: httpx.Client, request: httpx.Request, max_bytes: int, clock: Clock) -> Reply:
    body = _Body(request, max_bytes, clock)
    response = client.send(request, stream=True)
    try:
        for chunk in response.iter_bytes():
            body.add(chunk)
        return body.reply(response)
    finally:
        response.close()


def _provider(request: httpx.Request) -> str:
    provider: str = request.extensions.get("tokenbroker.provider", "provider")
    return provider


def _where(url: httpx.URL) -> str:
    """Scheme, host, port and path only: a query string or user info may carry a secret."""
    return str(url.copy_with(query=None, fragment=None, username=None, password=None))
