"""What a :class:`~tokenbroker.engine.cache.TokenCache` needs from its owner."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol, TypeVar

from ..grants import TokenResponse
from .slot import Timing

__all__ = ["Fetcher"]

K = TypeVar("K", bound=Hashable)


class Fetcher(Protocol[K]):
    """What the cache needs from its owner: key resolution and the actual fetching."""

    def resolve(self, raw: Hashable) -> K:
        """Map the caller's arguments to a canonical key (raise for unknown ones)."""

    def describe(self, key: K) -> tuple[str, str]:
        """``(provider, key in words)`` for events and status; no secrets."""

    def timing(self, key: K) -> Timing:
        """The key's refresh timing."""

    def fetch(self, key: K, stale: str | None) -> TokenResponse:
        """Obtain a token, blocking; ``stale`` is the access token to replace, if any."""

    async def afetch(self, key: K, stale: str | None) -> TokenResponse:
        """Obtain a token without blocking the event loop."""
