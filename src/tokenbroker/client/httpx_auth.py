"""``httpx.Auth`` that attaches a broker's token and, on a 401, invalidates and retries once.

One generator (:meth:`BrokerAuth._flow`) holds the logic; the sync and async
flows are drivers that only differ in how they get a token (STYLE 4).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from ..core.token import Token
from .target import TokenTarget

__all__ = ["BrokerAuth", "is_replayable"]


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
        target: The provider key to get tokens for.
    """

    def __init__(self, target: TokenTarget) -> None:
        self.target = target

    def __repr__(self) -> str:
        return f"BrokerAuth({self.target!r})"

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
        self.target.invalidate(token.access_token)
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
                    value = self.target.get()
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
                    value = await self.target.aget()
                else:
                    value = yield item
        except StopIteration:
            return
