"""``GET /v1/redirects/{route}/{path}``: a ``302`` to a configured upstream (the
``redirects:`` config section) with a fresh delegated token for ``path`` in ``Location``."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ...engine.broker import Broker
from ...engine.delegation import safe_object
from ..access import Caller, forwarded_user, trusted_networks
from ..audit import audited
from ..errors import NO_STORE, NotFound, documented

__all__ = ["add_routes"]


def add_routes(app: FastAPI, broker: Broker) -> None:
    """Add ``GET /v1/redirects/{route}/{path}`` to ``app``."""
    trusted = trusted_networks(broker.settings.server.trusted_proxies)

    @app.get(
        "/v1/redirects/{route}/{path:path}",
        status_code=302,
        response_class=Response,
        responses={
            302: {"description": "To the upstream, with a fresh delegated token."},
            **documented(404, 409, 500, 502, 503),
        },
    )
    async def redirect(route: str, path: str, caller: Caller, request: Request) -> Response:
        """``302`` to the route's upstream with a fresh delegated token in ``Location``.

        The token's subject is the consumer's own, or the user a front end in
        ``server.trusted_proxies`` names in ``X-Forwarded-User`` (which needs a
        ``delegate-as:PROVIDER`` rule unless it is the consumer's own subject).
        """
        spec = broker.settings.redirects.get(route)
        if spec is None or not caller.may_delegate(spec.provider) or not safe_object(path):
            raise NotFound("no such provider or scope for this key")
        requested = forwarded_user(request.scope, trusted)
        with audited(
            "redirect",
            caller,
            route=route,
            provider=spec.provider,
            audience=spec.audience,
            subject=caller.subject or caller.name if requested is None else requested,
            object=path,
        ) as record:
            subject = caller.delegation_subject(spec.provider, requested)
            token = await broker.adelegate(
                spec.provider, spec.audience, object_=path, subject=subject, actor=caller.name
            )
            record["jti"] = token.jti
        location = f"{spec.url.rstrip('/')}/{quote(path)}?{urlencode({spec.param: token.token})}"
        return Response(status_code=302, headers={**NO_STORE, "Location": location})
