"""``authorize``: a person re-authorises a refresh-token provider (authorization code + PKCE
``S256``); phases ``waiting_for_user → exchanging_code → verifying``.

Unlike the other kinds it is not run by the runner: :mod:`tokenbroker.jobs.authorization`
*parks* it in ``waiting_for_user`` when it starts (its lease released at once, so whichever
process on the store receives ``GET /v1/oauth/callback`` can take it over), finishes it from
the callback, and ends it ``failed`` / ``expired`` when its state expires. Not idempotent:
a code works once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ...config import RefreshTokenProvider, Settings
from ...errors import InvalidJobParamsError
from ..progress import PhasePlan
from .base import JobKind, KindContext, provider_param

__all__ = ["Authorize"]


class Authorize(JobKind):
    """Re-authorise a provider (see the module docstring)."""

    name: ClassVar[str] = "authorize"
    plan: ClassVar[PhasePlan] = PhasePlan(
        [("waiting_for_user", 1), ("exchanging_code", 1), ("verifying", 1)]
    )
    idempotent: ClassVar[bool] = False
    fields: ClassVar[frozenset[str]] = frozenset({"provider", "account"})
    parked: ClassVar[bool] = True

    def validate(self, params: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
        """``provider`` (required: a refresh_token provider with an ``authorization``
        block) and ``account`` (none: refresh-token providers have no accounts).

        Raises:
            InvalidJobParamsError: Naming the field at fault.
        """
        out = super().validate(params, settings)
        provider = provider_param(params, settings)
        assert provider is not None
        spec = settings.providers[provider]
        if not isinstance(spec, RefreshTokenProvider) or spec.authorization is None:
            raise InvalidJobParamsError(
                "provider", "is not a refresh_token provider with an authorization block"
            )
        if params.get("account") is not None:
            raise InvalidJobParamsError("account", "refresh_token providers have no accounts")
        out.pop("account", None)
        return out

    def items(self, ctx: KindContext) -> list[str]:
        """The provider (never run by the runner; see the module docstring)."""
        return [ctx.params["provider"]]

    def run_item(self, ctx: KindContext, item: str) -> None:
        """Refuse: only the callback finishes an authorize job."""
        raise RuntimeError("authorize jobs are finished by the OAuth callback")
