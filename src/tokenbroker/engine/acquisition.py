"""Token acquisition spans: :meth:`Broker.get_token` and ``aget_token`` while tracing is on.

Off, the broker calls its cache directly (a hit stays a dict lookup and a clock compare);
on, it comes here: one ``tokenbroker.token`` span per acquisition with ``provider``,
``scope`` (as asked; empty for the configured scopes), ``account`` and ``outcome`` — ``hit``,
``fetched`` (this caller led the token request), ``refreshed-ahead`` (served, and a
background refresh started), ``coalesced`` (joined another caller's request) or ``failed``.
The token request spans of a fetch are its children.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from ..core import tracing
from ..core.token import Token
from .cache import TokenCache

__all__ = ["aget", "get"]

#: The span's name.
NAME = "tokenbroker.token"


def _attributes(provider: str, scope: str | None, account: str | None) -> dict[str, str]:
    return {"provider": provider, "scope": scope or "", "account": account or ""}


def get(
    cache: TokenCache[Any], key: Hashable, provider: str, scope: str | None, account: str | None
) -> Token:
    """:meth:`TokenCache.get` inside a ``tokenbroker.token`` span."""
    with tracing.span(NAME, _attributes(provider, scope, account)) as span:
        token = cache.peek(key)
        if token is not None:
            span.set("outcome", "hit")
            return token
        try:
            return cache.fill(key, span)
        except Exception:
            span.set("outcome", "failed")
            raise


async def aget(
    cache: TokenCache[Any], key: Hashable, provider: str, scope: str | None, account: str | None
) -> Token:
    """:meth:`TokenCache.aget` inside a ``tokenbroker.token`` span."""
    with tracing.span(NAME, _attributes(provider, scope, account)) as span:
        token = cache.peek(key)
        if token is not None:
            span.set("outcome", "hit")
            return token
        try:
            return await cache.afill(key, span)
        except Exception:
            span.set("outcome", "failed")
            raise
