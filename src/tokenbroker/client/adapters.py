"""The auth adapters and context-manager protocol shared by :class:`~tokenbroker.Broker`
and :class:`~tokenbroker.BrokerClient`: written once, for any token source."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from .httpx_auth import BrokerAuth
from .target import TokenTarget

if TYPE_CHECKING:
    from .requests_auth import RequestsBrokerAuth

__all__ = ["AuthAdapters"]


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
