"""What a job kind declares: params, phases and weights, items, idempotency, and the work.

A kind runs in three steps, each one phase of its :class:`~tokenbroker.jobs.progress.PhasePlan`:
``resolve`` (list the items), the kind's *work* phase (one call of :meth:`JobKind.run_item`
per item, retried by the runner) and, when the plan has a third phase, ``verify`` (one
:meth:`JobKind.verify_item` per item that succeeded). Item names are secret-free words (an
account, a provider, a store row), so they can appear in events and ``failed[]``. The work
methods are blocking (the broker's API is): the runner calls them in worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config import Settings
from ...engine.broker import Broker
from ...errors import InvalidJobParamsError, UnknownProviderError
from ..progress import PhasePlan

__all__ = [
    "JobKind",
    "KindContext",
    "check_provider_known",
    "optional_items",
    "provider_param",
    "restrict",
]


@dataclass(frozen=True)
class KindContext:
    """What a kind's work may use.

    Attributes:
        broker: The broker (tokens through its normal fenced protocol; its store).
        params: The validated params.
        now: The jobs clock's wall time when the step started (epoch seconds).
    """

    broker: Broker
    params: Mapping[str, Any]
    now: float


class JobKind:
    """Base of the job kinds; subclasses set the class attributes and the work methods."""

    #: The kind's name (``warm``).
    name: ClassVar[str] = ""
    #: Its phases, in order: ``resolve``, the work phase, optionally ``verify``.
    plan: ClassVar[PhasePlan]
    #: Whether running an item twice is harmless: then a job whose worker was lost is
    #: resumed from its remaining items; otherwise it ends ``failed`` / ``worker_lost``.
    idempotent: ClassVar[bool] = True
    #: The params the kind accepts (others are refused, naming the field).
    fields: ClassVar[frozenset[str]] = frozenset()
    #: Waits for something outside the broker (a person's callback) with no lease held:
    #: the loop never claims it and the reaper leaves it be while it may still finish
    #: (:mod:`tokenbroker.jobs.authorization`).
    parked: ClassVar[bool] = False

    def validate(self, params: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
        """The params, checked and normalised.

        Raises:
            InvalidJobParamsError: Naming the field at fault.
        """
        unknown = sorted(set(params) - self.fields)
        if unknown:
            raise InvalidJobParamsError(unknown[0], f"not a param of {self.name} jobs")
        return dict(params)

    def providers(self, params: Mapping[str, Any], settings: Settings) -> list[str]:
        """The providers a job with ``params`` works on: a consumer must be allowed every
        one of them to start or see the job. The ``provider`` param when there is one;
        else every configured provider (``rotate_key`` touches every stored secret)."""
        provider = params.get("provider")
        if isinstance(provider, str):
            return [provider]
        return sorted(settings.providers)

    def items(self, ctx: KindContext) -> list[str]:
        """The items the job works on (the ``resolve`` phase)."""
        raise NotImplementedError

    def run_item(self, ctx: KindContext, item: str) -> None:
        """Do one item's work; raise to fail it (the runner classifies and retries)."""
        raise NotImplementedError

    def verify_item(self, ctx: KindContext, item: str) -> None:
        """Check one item that succeeded (the ``verify`` phase); raise to fail it."""

    def retry_wait(self, ctx: KindContext, item: str) -> float:
        """Seconds before another attempt at ``item`` would reach the provider rather than
        the token cache's remembered failure (:meth:`~tokenbroker.engine.broker.Broker.retry_in`);
        the runner waits at least this long between attempts. 0.0 for kinds whose items do
        not go through the token cache."""
        return 0.0

    @property
    def concurrency(self) -> int:
        """How many items of one job run at once (1 unless the kind says otherwise)."""
        return 1

    def concurrency_for(self, params: Mapping[str, Any]) -> int:
        """How many items of one job with ``params`` run at once."""
        return self.concurrency

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, idempotent={self.idempotent})"


def provider_param(
    params: Mapping[str, Any], settings: Settings, *, required: bool = True
) -> str | None:
    """The ``provider`` param, checked against the configured providers.

    Raises:
        InvalidJobParamsError: Missing (when required), not a string, or unknown.
    """
    value = params.get("provider")
    if value is None:
        if required:
            raise InvalidJobParamsError("provider", "is required")
        return None
    if not isinstance(value, str) or value not in settings.providers:
        raise InvalidJobParamsError("provider", "is not a configured provider")
    return value


def optional_items(params: Mapping[str, Any]) -> list[str] | None:
    """The ``items`` param (a retry job's subset of items), checked.

    Raises:
        InvalidJobParamsError: Not a non-empty list of short strings.
    """
    value = params.get("items")
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or len(value) > 10_000
        or not all(isinstance(v, str) and 0 < len(v) <= 200 for v in value)
    ):
        raise InvalidJobParamsError("items", "must be a non-empty list of item names")
    return list(dict.fromkeys(value))


def restrict(items: list[str], params: Mapping[str, Any]) -> list[str]:
    """``items`` limited to the ``items`` param, when given (order of ``items`` kept)."""
    wanted = params.get("items")
    if wanted is None:
        return items
    chosen = set(wanted)
    return [item for item in items if item in chosen]


def check_provider_known(broker: Broker, provider: str) -> None:
    """Raise UnknownProviderError when the broker does not know ``provider`` (config changed)."""
    if provider not in broker.settings.providers:
        raise UnknownProviderError(f"no provider named {provider!r}")
