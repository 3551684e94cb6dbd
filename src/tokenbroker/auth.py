"""``httpx.Auth`` that attaches a broker's token and, on a 401, invalidates and retries once.

One generator (:meth:`BrokerAuth._flow`) holds the logic; the sync and async
flows are drivers that only differ in how they get a token (STYLE 4).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Protocol

import httpx

from .token import Token

__all__ = ["BrokerAuth", "TokenSource", "is_replayable"]


class TokenSource(Protocol):
    """Anything that gives tokens for a provider: a :class:`~tokenbroker.Broker` or a client."""

    def get_token(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> Token:
        """Return a valid token."""

    async def aget_token(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> Token:
        """Return a valid token without blocking the loop."""

    def invalidate(
        self,
        provider: str,
        access_token: str,
        scope: str | None = None,
        *,
        account: str | None = None,
    ) -> bool:
        """Drop ``access_token`` if it is still the current one."""


class _NeedToken:
    """Sentinel yielded by the shared flow when it needs a (fresh) token."""


_NEED = _NeedToken()


def is_replayable(request: httpx.Request) -> bool:
    """Whether a request's body can be sent a second time.

    Args:
        request: The request.

    Returns:
        True when the body is absent or fully in memory (bytes, form, JSON).
    """
    return isinstance(request.stream, httpx.ByteStream)


class BrokerAuth(httpx.Auth):
    """Bearer auth from a :class:`TokenSource`, usable by sync and async httpx clients.

    Args:
        source: Where tokens come from.
        provider: The provider name.
        scope: Optional scope.
        account: Optional account (login providers).
    """

    def __init__(
        self,
        source: TokenSource,
        provider: str,
        scope: str | None = None,
        *,
        account: str | None = None,
    ) -> None:
        self._source = source
        self._provider = provider
        self._scope = scope
        self._account = account

    def __repr__(self) -> str:
        return f"BrokerAuth(provider={self._provider!r}, scope={self._scope!r})"

    def _flow(
        self, request: httpx.Request
    ) -> Generator[_NeedToken | httpx.Request, Token | httpx.Response, None]:
        token = yield _NEED
        assert isinstance(token, Token)
        request.headers["Authorization"] = token.authorization
        response = yield request
        assert isinstance(response, httpx.Response)
        if response.status_code != 401 or not is_replayable(request):
            return
        self._source.invalidate(
            self._provider, token.access_token, self._scope, account=self._account
        )
        fresh = yield _NEED
        assert isinstance(fresh, Token)
        request.headers["Authorization"] = fresh.authorization
        yield request

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Drive the shared flow for a sync client (httpx calls this)."""
        flow = self._flow(request)
        value: Token | httpx.Response | None = None
        try:
            while True:
                item = flow.send(value)  # type: ignore[arg-type]
                if isinstance(item, _NeedToken):
                    value = self._source.get_token(
                        self._provider, self._scope, account=self._account
                    )
                else:
                    value = yield item
        except StopIteration:
            return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Drive the shared flow for an async client (httpx calls this)."""
        flow = self._flow(request)
        value: Token | httpx.Response | None = None
        try:
            while True:
                item = flow.send(value)  # type: ignore[arg-type]
                if isinstance(item, _NeedToken):
                    value = await self._source.aget_token(
                        self._provider, self._scope, account=self._account
                    )
                else:
                    value = yield item
        except StopIteration:
            return
