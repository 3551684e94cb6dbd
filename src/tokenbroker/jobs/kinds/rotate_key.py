"""``rotate_key``: re-encrypt every stored secret under the first ``encryption_keys`` entry,
one store row per item, each in its own transaction; phases ``resolve → reseal → verify``.

Resumable: an item is a row still under an old key
(:meth:`~tokenbroker.store.base.Store.stale_secrets`), and resealing a row twice is a no-op,
so a job whose worker was lost is resumed from its remaining rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ...config import Settings
from ...errors import StoreError
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
        """Every row holding a ciphertext not under the primary key."""
        return restrict(ctx.broker.store.stale_secrets(), ctx.params)

    def run_item(self, ctx: KindContext, item: str) -> None:
        """Re-encrypt one row (a no-op when it is done already)."""
        ctx.broker.store.reseal_row(item)

    def verify_item(self, ctx: KindContext, item: str) -> None:
        """The row no longer needs the old key.

        Raises:
            StoreError: It still does.
        """
        if item in ctx.broker.store.stale_secrets():
            raise StoreError("a row is still under an old key after resealing")
