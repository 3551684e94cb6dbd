"""``rotate_key``: re-encrypt every stored secret under the first ``encryption_keys`` entry,
one store row per item, each in its own transaction; phases ``resolve → reseal → verify``.

Resumable: an item is a row still under an old key
(:meth:`~tokenbroker.store.base.Store.stale_secrets`), and resealing a row twice is a no-op,
so a job whose worker was lost is resumed from its remaining rows.

``authorize`` jobs waiting for a person are items too (``authorize_job/ID``): their PKCE
verifier and URL are sealed in the job's document under the key of the day, so they are
re-sealed (:meth:`~tokenbroker.jobs.authorization.Authorizations.reseal`) and the old key
can leave the config without breaking a sign-in in progress.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ...config import JobsSettings, Settings
from ...core.clock import SystemClock
from ...errors import StoreError
from ..authorization import ITEM_PREFIX, Authorizations
from ..progress import PhasePlan
from .base import JobKind, KindContext, optional_items, restrict

__all__ = ["RotateKey"]


class RotateKey(JobKind):
    """Re-encrypt the store row by row (see the module docstring)."""

    name: ClassVar[str] = "rotate_key"
    plan: ClassVar[PhasePlan] = PhasePlan([("resolve", 1), ("reseal", 8), ("verify", 1)])
    idempotent: ClassVar[bool] = True
    fields: ClassVar[frozenset[str]] = frozenset({"items"})

    def validate(self, params: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
        """No params but ``items`` (a retry's subset).

        Raises:
            InvalidJobParamsError: Naming the field at fault.
        """
        out = super().validate(params, settings)
        optional_items(params)
        return out

    def items(self, ctx: KindContext) -> list[str]:
        """Every row holding a ciphertext not under the primary key, then every waiting
        authorize job whose sealed record is under an old key."""
        stale = [*ctx.broker.store.stale_secrets(), *_authorizations(ctx).stale()]
        return restrict(stale, ctx.params)

    def run_item(self, ctx: KindContext, item: str) -> None:
        """Re-encrypt one row or authorize job (a no-op when it is done already)."""
        if item.startswith(ITEM_PREFIX):
            _authorizations(ctx).reseal(item)
        else:
            ctx.broker.store.reseal_row(item)

    def verify_item(self, ctx: KindContext, item: str) -> None:
        """The row no longer needs the old key.

        Raises:
            StoreError: It still does.
        """
        if item.startswith(ITEM_PREFIX):
            stale = item in _authorizations(ctx).stale()
        else:
            stale = item in ctx.broker.store.stale_secrets()
        if stale:
            raise StoreError("a row is still under an old key after resealing")


def _authorizations(ctx: KindContext) -> Authorizations:
    """The broker's authorize jobs (only their sealed records are used here)."""
    return Authorizations(ctx.broker, JobsSettings(), SystemClock(), owner="rotate_key")
