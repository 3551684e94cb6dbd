"""What an auth adapter asks for: a token source (a local broker or a remote one) and the
one provider/scope/account target it hands tokens for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..core.token import Token

__all__ = ["TokenSource", "TokenTarget"]


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
