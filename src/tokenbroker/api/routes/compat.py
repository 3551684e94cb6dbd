"""Compatibility routes shaped like the services the broker replaces (issue 19 §5).

``compat.get_token`` adds the Tesla token owner's ``GET /get-token`` (the path is
configurable): ``200 {"status": "success", "access_token", "token_source",
"remaining_minutes"}`` with a token of the configured provider, else the status of the
house error table with ``{"status": "error", "error": MESSAGE, "code": CODE}`` (``code``
is an addition; the original's clients read ``status`` and ``error``). Off until configured.

The route needs a consumer key like every other (the consumer's ACL must allow the provider
and scope). Only an explicit ``trusted_networks`` list waives it, for callers whose TCP peer
(not ``X-Forwarded-For``) is on one of those networks; they are audited as the consumer
``compat-trusted-network``. Answers carry ``Cache-Control: no-store``; never a refresh token.
"""

from __future__ import annotations

import ipaddress
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from ...config.sections import CompatGetToken
from ...core.rules import parse_rule
from ...engine.broker import Broker
from ...engine.consumers import Consumer
from ...errors import TokenBrokerError
from ..access import aauthenticate, check_allowed, trusted_networks
from ..audit import audited, shown_scope
from ..connection import PEER
from ..errors import NO_STORE, documented, error_response

__all__ = ["TRUSTED_CONSUMER", "add_routes", "get_token_json"]

#: The consumer name audit lines give a caller whose key was waived by ``trusted_networks``.
TRUSTED_CONSUMER = "compat-trusted-network"

#: ``token_source`` of every success: the original said where its token came from.
TOKEN_SOURCE = "tokenbroker"

_bearer = HTTPBearer(auto_error=False, description="A consumer API key.")


def get_token_json(access_token: str, expires_in: int) -> dict[str, object]:
    """The success body of ``compat.get_token``.

    Args:
        access_token: The token.
        expires_in: Whole seconds it has left.

    Returns:
        ``{"status": "success", "access_token", "token_source", "remaining_minutes"}``,
        the minutes rounded down (``expires_in // 60``) as the original's clients expect.
    """
    return {
        "status": "success",
        "access_token": access_token,
        "token_source": TOKEN_SOURCE,
        "remaining_minutes": expires_in // 60,
    }


def add_routes(app: FastAPI, broker: Broker) -> None:
    """Add the configured compatibility routes (none unless ``compat:`` sets one) to ``app``."""
    spec = broker.settings.compat.get_token
    if spec is not None:
        _add_get_token(app, broker, spec)


def _add_get_token(app: FastAPI, broker: Broker, spec: CompatGetToken) -> None:
    networks = trusted_networks(spec.trusted_networks)
    waived = Consumer(TRUSTED_CONSUMER, (parse_rule(spec.provider),))

    async def get_token(request: Request) -> JSONResponse:
        """A token of the configured provider in the Tesla token owner's shape."""
        try:
            caller = await _caller(request, networks, waived)
            with audited(
                "token read", caller, provider=spec.provider, scope=shown_scope([spec.scope])
            ) as line:
                checked = line["scope"] = check_allowed(broker, caller, spec.provider, spec.scope)
                token = await broker.aget_token(spec.provider, checked)
        except TokenBrokerError as exc:
            return _error(exc)
        body = get_token_json(token.access_token, token.expires_in)
        return JSONResponse(body, headers=NO_STORE)

    app.add_api_route(
        spec.path,
        get_token,
        methods=["GET"],
        tags=["compat"],
        responses=documented(404, 500, 503),
        summary="Tesla token owner compatible token read",
    )


async def _caller(
    request: Request,
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
    waived: Consumer,
) -> Consumer:
    credentials = await _bearer(request)
    key = credentials.credentials if credentials else None
    if key is None and _peer_trusted(request, networks):
        return waived
    source = request.client.host if request.client else "unknown"
    return await aauthenticate(request.app.state.consumers, request.app.state.limits, key, source)


def _peer_trusted(
    request: Request, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    """Whether the TCP peer (uvicorn rewrites ``client`` from X-Forwarded-For, which any
    caller may send, so the peer is read) is on one of ``networks``."""
    if not networks:
        return False
    peer = request.scope.get(PEER, request.scope.get("client"))
    try:
        address = ipaddress.ip_address(peer[0]) if peer else None
    except ValueError:
        return False
    return address is not None and any(address in network for network in networks)


def _error(exc: TokenBrokerError) -> JSONResponse:
    """The house answer for ``exc`` (status, headers) in the original's error shape."""
    house = error_response(exc)
    error = json.loads(bytes(house.body))["error"]
    headers = {k: v for k, v in house.headers.items() if k.lower() != "content-length"}
    return JSONResponse(
        {"status": "error", "error": error["message"], "code": error["code"]},
        status_code=house.status_code,
        headers=headers,
    )
