"""``GET /v1/redirects/{route}/{path}``: a ``302`` to a configured upstream (the
``redirects:`` config section) with a fresh delegated token for ``path`` in ``Location``."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from fastapi import FastAPI
from fastapi.responses import Response

from ...engine.broker import Broker
from ...engine.delegation import safe_object
from ..access import Caller
from ..audit import audited
from ..errors import NO_STORE, NotFound, documented

__all__ = ["add_routes"]


def add_routes(app: FastAPI, broker: Broker) -> None:
    """Add ``GET /v1/redirects/{route}/{path}`` to ``app``."""

    @app.get(
        "/v1/redirects/{route}/{path:path}",
        status_code=302,
        response_class=Response,
        responses={
            302: {"description": "To the upstream, with a fresh delegated token."},
            **documented(404, 409, 500, 503),
        },
    )
    async def redirect(route: str, path: str, caller: Caller) -> Response:
        """``302`` to the route's upstream with a fresh delegated token in ``Location``."""
        spec = broker.settings.redirects.get(route)
        if spec is None or not caller.may_delegate(spec.provider) or not safe_object(path):
            raise NotFound("no such provider or scope for this key")
        subject = caller.delegation_subject(spec.provider)
        with audited(
            "redirect",
            caller,
            route=route,
            provider=spec.provider,
            audience=spec.audience,
            subject=subject,
            object=path,
        ) as record:
            token = await broker.adelegate(
                spec.provider, spec.audience, object_=path, subject=subject, actor=caller.name
            )
            record["jti"] = token.jti
        location = f"{spec.url.rstrip('/')}/{quote(path)}?{urlencode({spec.param: token.token})}"
        return Response(status_code=302, headers={**NO_STORE, "Location": location})
