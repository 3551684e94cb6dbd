"""``POST /v1/delegations``: a short-lived token for one audience (and object), minted by
the broker or obtained upstream (:meth:`tokenbroker.engine.broker.Broker.adelegate`)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ...engine.broker import Broker
from ...engine.delegation import check_object
from ..access import Caller, forwarded_user, trusted_networks
from ..audit import audited
from ..errors import NO_STORE, NotFound, documented
from ..models import DelegationIn, DelegationOut

__all__ = ["add_routes"]


def add_routes(app: FastAPI, broker: Broker) -> None:
    """Add ``POST /v1/delegations`` to ``app``."""
    trusted = trusted_networks(broker.settings.server.trusted_proxies)

    @app.post(
        "/v1/delegations",
        response_model=DelegationOut,
        responses=documented(404, 409, 500, 502, 503, 400, 403),
    )
    async def delegations(body: DelegationIn, caller: Caller, request: Request) -> JSONResponse:
        """A short-lived token for one audience (and object), minted or obtained upstream.

        Needs a ``delegate:PROVIDER`` rule (else the 404 of an unknown provider). The token's
        subject is the consumer's own; naming another needs ``delegate-as:PROVIDER`` (else 403
        ``forbidden_subject``). A subject may be named in the body or, by a front end in
        ``server.trusted_proxies``, in ``X-Forwarded-User`` (the body wins when both do). A
        malformed object or subject is 400 ``invalid_delegation``. A failing upstream
        delegation endpoint is 502 ``delegation_failed``; the broker's own service token
        unavailable is 503 ``provider_unavailable``.
        """
        requested = body.subject
        if requested is None:
            requested = forwarded_user(request.scope, trusted)
        with audited(
            "delegation",
            caller,
            provider=body.provider,
            audience=body.audience,
            subject=caller.subject or caller.name if requested is None else requested,
            object=body.object,
        ) as record:
            if not caller.may_delegate(body.provider):  # audited too, as every refusal is
                raise NotFound("no such provider")
            check_object(body.object)
            token = await broker.adelegate(
                body.provider,
                body.audience,
                object_=body.object,
                subject=caller.delegation_subject(body.provider, requested),
                lifetime=body.lifetime_seconds,
                actor=caller.name,
            )
            record["jti"] = token.jti
        return JSONResponse(
            {
                "token": token.token,
                "token_type": token.token_type,
                "expires_at": int(token.expires_at),
                "expires_in": token.expires_in,
                "audience": token.audience,
                "object": token.object,
            },
            headers=NO_STORE,
        )
