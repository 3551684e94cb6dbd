"""``refresh``: force a new token for every key of a provider, through the normal fenced
protocol; phases ``resolve → refresh``.

Each item drops the key's current token by compare-and-invalidate and asks again, so the
cache's single flight and the store's fenced lease make one token request per key however
many jobs and callers race (a second drop within the provider's invalidate cooldown keeps
the fresh token). Not idempotent: a refresh spends a (possibly single-use) refresh token,
so a job whose worker was lost ends ``failed`` / ``worker_lost`` for an operator to rerun.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ...config import Settings
from ..progress import PhasePlan
from .base import JobKind, KindContext, optional_items, provider_param, restrict
from .warm import provider_items, target_of

__all__ = ["Refresh"]


class Refresh(JobKind):
    """Force a refresh of a provider's keys (see the module docstring)."""

    name: ClassVar[str] = "refresh"
    plan: ClassVar[PhasePlan] = PhasePlan([("resolve", 1), ("refresh", 9)])
    idempotent: ClassVar[bool] = False
    fields: ClassVar[frozenset[str]] = frozenset({"provider", "scopes", "items"})

    def validate(self, params: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
        """``provider`` (required), ``items`` (a retry's subset).

        Raises:
            InvalidJobParamsError: Naming the field at fault.
        """
        out = super().validate(params, settings)
        provider_param(params, settings)
        optional_items(params)
        return out

    def retry_wait(self, ctx: KindContext, item: str) -> float:
        """How long the token cache keeps serving the key's last failure."""
        provider = ctx.params["provider"]
        return ctx.broker.retry_in(provider, **target_of(ctx, provider, item))

    def items(self, ctx: KindContext) -> list[str]:
        """The provider's keys (limited to ``params.items``)."""
        return restrict(provider_items(ctx, ctx.params["provider"]), ctx.params)

    def run_item(self, ctx: KindContext, item: str) -> None:
        """Drop the current token (compare-and-invalidate) and obtain a new one."""
        provider = ctx.params["provider"]
        target = target_of(ctx, provider, item)
        current = ctx.broker.peek_token(provider, **target)
        if current is not None:
            ctx.broker.invalidate(provider, current.access_token, **target)
        ctx.broker.get_token(provider, **target)
