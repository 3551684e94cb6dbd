"""``keepalive``: refresh the refresh tokens that die when idle before they do; phases
``resolve → refresh``.

For every ``refresh_token`` provider with ``rotation.idle_expiry_days`` (or only
``params.provider``), an item is due when its last refresh (as the store records it) is
older than ``jobs.keepalive_fraction`` of that period, or unknown. A due item's token is
dropped by compare-and-invalidate and fetched again, which uses (and rotates) the refresh
token through the normal fenced protocol. Idempotent: an item refreshed already is no
longer due. Usually scheduled (``jobs.schedule``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ...config import RefreshTokenProvider, Settings
from ...errors import InvalidJobParamsError
from ..progress import PhasePlan
from .base import JobKind, KindContext, optional_items, provider_param, restrict

__all__ = ["Keepalive", "idle_providers"]


def idle_providers(settings: Settings) -> list[str]:
    """The refresh-token providers whose tokens expire when idle, by name."""
    return sorted(
        name
        for name, p in settings.providers.items()
        if isinstance(p, RefreshTokenProvider) and p.rotation.idle_expiry_days is not None
    )


class Keepalive(JobKind):
    """Refresh idle refresh tokens before they expire (see the module docstring)."""

    name: ClassVar[str] = "keepalive"
    plan: ClassVar[PhasePlan] = PhasePlan([("resolve", 1), ("refresh", 9)])
    idempotent: ClassVar[bool] = True
    fields: ClassVar[frozenset[str]] = frozenset({"provider", "items"})

    def validate(self, params: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
        """``provider`` (optional: one of the idle-expiring providers), ``items``.

        Raises:
            InvalidJobParamsError: Naming the field at fault.
        """
        out = super().validate(params, settings)
        provider = provider_param(params, settings, required=False)
        if provider is not None and provider not in idle_providers(settings):
            raise InvalidJobParamsError(
                "provider", "is not a refresh_token provider with rotation.idle_expiry_days"
            )
        optional_items(params)
        return out

    def providers(self, params: Mapping[str, Any], settings: Settings) -> list[str]:
        """The ``provider`` param, else every idle-expiring refresh-token provider."""
        provider = params.get("provider")
        return [provider] if isinstance(provider, str) else idle_providers(settings)

    def items(self, ctx: KindContext) -> list[str]:
        """The providers that are due (limited to ``params.provider`` / ``params.items``)."""
        settings = ctx.broker.settings
        names = idle_providers(settings)
        if ctx.params.get("provider") is not None:
            names = [n for n in names if n == ctx.params["provider"]]
        last: dict[str, float] = {}
        for state in ctx.broker.store.states():
            if state["provider"] in names and state["last_refresh"] is not None:
                last[state["provider"]] = max(
                    last.get(state["provider"], 0.0), state["last_refresh"]
                )
        fraction = settings.jobs.keepalive_fraction
        due = []
        for name in names:
            provider = settings.providers[name]
            assert isinstance(provider, RefreshTokenProvider)
            days = provider.rotation.idle_expiry_days or 0.0
            if name not in last or ctx.now - last[name] > fraction * days * 86_400:
                due.append(name)
        return restrict(due, ctx.params)

    def retry_wait(self, ctx: KindContext, item: str) -> float:
        """How long the token cache keeps serving the provider's last failure."""
        return ctx.broker.retry_in(item)

    def run_item(self, ctx: KindContext, item: str) -> None:
        """Use the provider's refresh token once: drop the current token and fetch again."""
        current = ctx.broker.peek_token(item)
        if current is not None:
            ctx.broker.invalidate(item, current.access_token)
        ctx.broker.get_token(item)
