"""Token routes: ``GET /v1/tokens/{provider}`` (read) and ``POST …/invalidate``.

The read is the hot route, so it is served by :class:`TokenRead`, a plain ASGI endpoint
that skips FastAPI's dependency and validation machinery (it is why the API answers at
about the speed of a bare endpoint). It is still declared once, as :func:`get_token`:
FastAPI documents that signature in the OpenAPI document, and the route built from it
hands every request to :class:`TokenRead` instead of calling it. Every answer that
carries a token has ``Cache-Control: no-store`` and ``Pragma: no-cache``; none carries a
refresh token.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, cast
from urllib.parse import parse_qs

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from ...core.token import Token
from ...engine.broker import Broker
from ...errors import TokenBrokerError
from ...telemetry.metrics import Metrics
from ..access import Caller, check_allowed, scope_caller
from ..audit import audited, shown_scope
from ..errors import NO_STORE, InvalidRequest, documented, error_response
from ..models import SCOPE_PATTERN, InvalidateIn, InvalidateOut, TokenOut

__all__ = ["TokenRead", "add_routes", "get_token", "token_json"]

#: What the token routes may answer besides 200 (and the app-wide 401/429).
ERRORS = documented(404, 409, 500, 503)


async def get_token(
    provider: str,
    caller: Caller,
    scope: Annotated[str | None, Query(max_length=1024, pattern=SCOPE_PATTERN)] = None,
    account: Annotated[str | None, Query(max_length=256)] = None,
) -> None:
    """A valid access token for ``provider`` (never a refresh token)."""


class TokenRead:
    """``GET /v1/tokens/{provider}`` as a plain ASGI endpoint: the checks :func:`get_token`
    declares (consumer key, one ``scope`` in the ACL, ``account`` of at most 256
    characters), the same error table and headers, without FastAPI's machinery.

    The route that hands requests to it matches only ``GET`` (others get the app's 405) and
    puts itself in ``scope["route"]`` for the request metrics' route label.

    Args:
        broker: The broker.
        meter: Metrics.
    """

    _HEADERS = [
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-store"),
        (b"pragma", b"no-cache"),
    ]

    def __init__(self, broker: Broker, meter: Metrics) -> None:
        self.broker = broker
        self.meter = meter
        self._reads: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            caller = await scope_caller(scope)
            provider: str = scope["path_params"]["provider"]
            query = parse_qs(
                scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
            )
            wanted = query.get("scope", [None])
            account = query.get("account", [None])[-1] or None
            with audited(
                "token read", caller, provider=provider, scope=shown_scope(wanted)
            ) as line:
                if len(wanted) > 1:
                    raise InvalidRequest("invalid request: scope given more than once")
                if account and len(account) > 256:
                    raise InvalidRequest("invalid request: account too long")
                checked = line["scope"] = check_allowed(self.broker, caller, provider, wanted[0])
                if account:
                    line["account"] = account
                token = await self.broker.aget_token(provider, checked, account=account)
        except TokenBrokerError as exc:
            await error_response(exc)(scope, receive, send)
            return
        body = json.dumps(token_json(token), separators=(",", ":")).encode()
        headers = [*self._HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        counter = self._reads.get(provider)
        if counter is None:
            counter = self._reads[provider] = self.meter.token_reads.labels(provider)
        counter.inc()


def add_routes(app: FastAPI, broker: Broker, meter: Metrics) -> None:
    """Add the token read (served by :class:`TokenRead`) and the invalidation to ``app``."""
    app.router.add_api_route(
        "/v1/tokens/{provider}",
        get_token,
        methods=["GET"],
        response_model=TokenOut,
        responses=ERRORS,
        route_class_override=_DeclaredRoute,
    )
    cast(_DeclaredRoute, app.router.routes[-1]).app = TokenRead(broker, meter)

    @app.post("/v1/tokens/{provider}/invalidate", response_model=InvalidateOut, responses=ERRORS)
    async def invalidate(provider: str, body: InvalidateIn, caller: Caller) -> JSONResponse:
        """Report a rejected token: it is dropped only if still current, then the current
        token is returned (one refresh however many consumers report it)."""
        with audited(
            "token invalidate", caller, provider=provider, scope=shown_scope([body.scope])
        ) as line:
            checked = line["scope"] = check_allowed(broker, caller, provider, body.scope)
            if body.account:
                line["account"] = body.account
            # In a worker thread: the cross-replica cooldown may wait on Redis (one bounded
            # timeout) and the drop on the store; neither may stall the event loop.
            dropped = await asyncio.to_thread(
                broker.invalidate, provider, body.access_token, checked, account=body.account
            )
            token = await broker.aget_token(provider, checked, account=body.account)
        return JSONResponse({**token_json(token), "invalidated": dropped}, headers=NO_STORE)


class _DeclaredRoute(APIRoute):
    """A route FastAPI documents from its endpoint's declaration, whose requests go to its
    ``app`` (set after construction) by Starlette's plain matching: the hot route skips
    FastAPI's included-router lookups too (about a microsecond a request); it is never
    included in another router."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = Route.matches(self, scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await Route.handle(self, scope, receive, send)


def token_json(token: Token) -> dict[str, Any]:
    """The body of a token answer (:class:`~tokenbroker.api.models.TokenOut`): the access
    token and its type, expiry and scope; never a refresh token."""
    return {
        "access_token": token.access_token,
        "token_type": token.token_type,
        "expires_at": int(token.expires_at),
        "expires_in": token.expires_in,
        "scope": token.scope,
    }
