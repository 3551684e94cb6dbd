"""``GET /v1/providers``: the providers the calling consumer may use, and their state."""

from __future__ import annotations

from fastapi import FastAPI

from ...engine.broker import Broker
from ..access import Caller
from ..models import ProviderOut, ProvidersOut

__all__ = ["add_routes"]


def add_routes(app: FastAPI, broker: Broker) -> None:
    """Add ``GET /v1/providers`` to ``app``."""

    @app.get("/v1/providers", response_model=ProvidersOut)
    async def providers(caller: Caller) -> ProvidersOut:
        """The providers this consumer may use, each with its worst state over its configured
        scopes and every pool account (as ``/health``); no secrets."""
        states = broker.provider_summaries()
        out = []
        for name in caller.providers():
            settings = broker.settings.providers.get(name)
            if settings is None:
                continue
            slot = states.get(name)
            out.append(
                ProviderOut(
                    name=name,
                    grant=settings.grant,
                    state=slot.state if slot else "empty",
                    valid_until=_int(slot.valid_until) if slot else None,
                    last_refresh=_int(slot.last_refresh) if slot else None,
                    last_error=slot.last_error if slot else None,
                )
            )
        return ProvidersOut(providers=out)


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
