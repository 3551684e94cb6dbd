"""``httpx.Auth`` that attaches a broker's token and, on a 401, invalidates and retries once.

One generator (:meth:`BrokerAuth._flow`) holds the logic; the sync and async
flows are drivers that only differ in how they get a token (STYLE 4).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

import httpx

from .token import Token

if TYPE_CHECKING:
    from .requests_auth import RequestsBrokerAuth

__all__ = ["AuthAdapters", "BrokerAuth", "TokenSource", "TokenTarget", "is_replayable"]


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


@dataclass(frozen=True, slots=True)
class TokenTarget:
    """One provider key of a token source: what an auth adapter asks for.

    Attributes:
        source: Where tokens come from.
        provider: The provider name.
        scope: Optional scope.
        account: Optional account (login providers).
    """

    source: TokenSource
    provider: str
    scope: str | None = None
    account: str | None = None

    def get(self) -> Token:
        """A valid token (blocking)."""
        return self.source.get_token(self.provider, self.scope, account=self.account)

    async def aget(self) -> Token:
        """A valid token (async)."""
        return await self.source.aget_token(self.provider, self.scope, account=self.account)

    def invalidate(self, access_token: str) -> bool:
        """Report ``access_token`` rejected (compare-and-invalidate)."""
        return self.source.invalidate(self.provider, access_token, self.scope, account=self.account)

    def __repr__(self) -> str:
        return f"TokenTarget(provider={self.provider!r}, scope={self.scope!r})"


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


class AuthAdapters:
    """``httpx_auth``, ``requests_auth`` and the (async) context-manager protocol for any
    token source that can build a :class:`TokenTarget` and close itself (shared by
    :class:`~tokenbroker.Broker` and :class:`~tokenbroker.BrokerClient`)."""

    def _target(self, provider: str, scope: str | None, account: str | None) -> TokenTarget:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Wait for background work, then :meth:`close`."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def httpx_auth(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> BrokerAuth:
        """An ``httpx.Auth`` for sync and async clients; on a 401 it invalidates and retries once.

        Args:
            provider: The provider's name.
            scope: Optional scopes (space-separated).
            account: Optional account (login providers).

        Returns:
            The auth object.

        Raises:
            UnknownProviderError: The provider, scope or account is unknown or malformed.
        """
        return BrokerAuth(self._target(provider, scope, account))

    def requests_auth(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> RequestsBrokerAuth:
        """A ``requests`` auth object (needs the ``requests`` package); same 401 handling.

        Args:
            provider: The provider's name.
            scope: Optional scopes (space-separated).
            account: Optional account (login providers).

        Returns:
            The auth object.

        Raises:
            UnknownProviderError: The provider, scope or account is unknown or malformed.
        """
        from .requests_auth import RequestsBrokerAuth  # noqa: PLC0415 - requests is optional

        return RequestsBrokerAuth(self._target(provider, scope, account))
