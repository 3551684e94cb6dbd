"""Probes, open to any client (:data:`tokenbroker.api.access.PUBLIC_PATHS`): ``/livez``,
``/readyz``, ``/health`` (and ``/healthz``), ``/metrics`` and the JWKS of the broker's
delegated JWTs at ``/.well-known/jwks.json``."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ...engine.broker import Broker
from ...engine.cache import DEGRADED
from ...errors import StoreError
from ...telemetry.metrics import CONTENT_TYPE, Metrics
from ..models import Status

__all__ = ["add_routes"]


def add_routes(app: FastAPI, broker: Broker, meter: Metrics) -> None:
    """Add the probes to ``app``."""
    store = _StoreCheck(broker)

    @app.get("/livez", response_model=Status, tags=["probes"])
    async def livez() -> Status:
        """Always 200 while the process serves requests."""
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, tags=["probes"], responses={503: {"model": Status}})
    async def readyz() -> JSONResponse:
        """200 when the store answers and every ``required: true`` provider has a token for its
        configured scopes (tokens consumers asked for with other scopes do not count)."""
        health = await _health(broker, store)
        ready = health.store == "ok" and not broker.unready()
        return JSONResponse(health.model_dump(), status_code=200 if ready else 503)

    @app.get("/health", response_model=Status, tags=["probes"])
    async def health() -> Status:
        """Status with per-provider state; ``degraded`` names what is wrong."""
        return await _health(broker, store)

    app.add_api_route("/healthz", health, methods=["GET"], response_model=Status, tags=["probes"])

    @app.get("/.well-known/jwks.json", tags=["probes"])
    async def jwks() -> JSONResponse:
        """Public keys that verify the broker's delegated JWTs (RFC 7517)."""
        keys = await asyncio.to_thread(broker.jwks)
        return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})

    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics_endpoint() -> Response:
        """Prometheus metrics."""
        return Response(meter.render(), media_type=CONTENT_TYPE)


class _StoreCheck:
    """Asks the store for its clock in a worker thread, never on the event loop (a store
    waiting out a lock would stall every request); probes arriving meanwhile share one check."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._running: asyncio.Future[str] | None = None

    async def __call__(self) -> str:
        running = self._running
        if running is None:
            running = self._running = asyncio.ensure_future(asyncio.to_thread(self._check))
            running.add_done_callback(self._done)
        return await asyncio.shield(running)

    def _done(self, running: asyncio.Future[str]) -> None:
        self._running = None

    def _check(self) -> str:
        try:
            self._broker.store.now()
        except StoreError:
            return "error"
        return "ok"


async def _health(broker: Broker, store: _StoreCheck) -> Status:
    """The store's answer and each provider's worst state over its configured scopes and every
    pool account; ``degraded`` when the store fails, a provider is stale, failed or needs
    reauthorization, or the broker runs without a part (Redis unreachable: named, with the
    reason, under ``degraded``)."""
    state = await store()
    providers = broker.provider_states()
    missing = broker.degraded()
    bad = state != "ok" or bool(missing) or any(value in DEGRADED for value in providers.values())
    return Status(
        status="degraded" if bad else "ok",
        store=state,
        providers=providers,
        degraded=missing or None,
    )
