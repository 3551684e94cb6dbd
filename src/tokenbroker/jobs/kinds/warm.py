"""``warm``: obtain a token for every account (a login pool) or every configured scope of
one provider, with bounded concurrency; phases ``resolve → fetch → verify``.

Items are account names for a login provider, else ``default`` (the configured scopes) and
one ``scope:S`` per extra scope given in ``params.scopes``. Idempotent: a token already
cached is not fetched again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ...config import LoginProvider, Settings
from ...errors import InvalidJobParamsError, ProviderUnavailableError
from ..progress import PhasePlan
from .base import JobKind, KindContext, optional_items, provider_param, restrict

__all__ = ["Warm", "provider_items", "target_of"]


def provider_items(ctx: KindContext, provider: str) -> list[str]:
    """The keys of ``provider`` as item names (accounts, or ``default`` + ``scope:S``)."""
    if isinstance(ctx.broker.settings.providers[provider], LoginProvider):
        return ctx.broker.accounts(provider)
    return ["default", *(f"scope:{s}" for s in ctx.params.get("scopes", []))]


def target_of(ctx: KindContext, provider: str, item: str) -> dict[str, Any]:
    """The ``get_token`` keyword arguments for one item of ``provider``."""
    if isinstance(ctx.broker.settings.providers[provider], LoginProvider):
        return {"account": item}
    if item.startswith("scope:"):
        return {"scope": item.removeprefix("scope:")}
    return {}


class Warm(JobKind):
    """Log in / fetch every key of a provider (see the module docstring)."""

    name: ClassVar[str] = "warm"
    plan: ClassVar[PhasePlan] = PhasePlan([("resolve", 1), ("fetch", 8), ("verify", 1)])
    idempotent: ClassVar[bool] = True
    fields: ClassVar[frozenset[str]] = frozenset({"provider", "scopes", "concurrency", "items"})

    def validate(self, params: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
        """``provider`` (required), ``scopes`` (list of extra scopes), ``concurrency``
        (1-32, default 4), ``items`` (a retry's subset).

        Raises:
            InvalidJobParamsError: Naming the field at fault.
        """
        out = super().validate(params, settings)
        provider_param(params, settings)
        scopes = params.get("scopes", [])
        if not isinstance(scopes, list) or not all(
            isinstance(s, str) and s and len(s) < 200 for s in scopes
        ):
            raise InvalidJobParamsError("scopes", "must be a list of scope strings")
        concurrency = params.get("concurrency", 4)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise InvalidJobParamsError("concurrency", "must be an integer")
        if not 1 <= concurrency <= 32:
            raise InvalidJobParamsError("concurrency", "must be within 1-32")
        optional_items(params)
        return out

    def concurrency_for(self, params: Mapping[str, Any]) -> int:
        """``params.concurrency`` (default 4)."""
        return int(params.get("concurrency", 4))

    def items(self, ctx: KindContext) -> list[str]:
        """The provider's accounts or scopes (limited to ``params.items``)."""
        return restrict(provider_items(ctx, ctx.params["provider"]), ctx.params)

    def run_item(self, ctx: KindContext, item: str) -> None:
        """Obtain the item's token (a cache hit when it is warm already)."""
        provider = ctx.params["provider"]
        ctx.broker.get_token(provider, **target_of(ctx, provider, item))

    def retry_wait(self, ctx: KindContext, item: str) -> float:
        """How long the token cache keeps serving the item's last failure."""
        provider = ctx.params["provider"]
        return ctx.broker.retry_in(provider, **target_of(ctx, provider, item))

    def verify_item(self, ctx: KindContext, item: str) -> None:
        """The item's token is fresh in this process's cache (after a resume, the token
        another process obtained is read from the store, not asked for again).

        Raises:
            ProviderUnavailableError: It is not.
        """
        provider = ctx.params["provider"]
        target = target_of(ctx, provider, item)
        if ctx.broker.peek_token(provider, **target) is None:
            ctx.broker.get_token(provider, **target)
        if ctx.broker.peek_token(provider, **target) is None:
            raise ProviderUnavailableError(f"{provider}: no fresh token after warming")
