"""A demo upstream API: data for callers with a live token, downloads for delegated JWTs.

``GET /api/data`` answers 200 only with a bearer token the test authorization
server issued and still accepts (it asks the server's protected resource);
``GET /download/{path}?token=…`` answers 200 only with a delegated JWT from the
broker whose signature (JWKS), audience and ``obj`` claim match.
"""

from __future__ import annotations

from typing import Any

import httpx
import jwt
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .authserver import AuthorizationServer

__all__ = ["demo_upstream"]


def demo_upstream(idp: AuthorizationServer, jwks_url: str, audience: str) -> FastAPI:
    """Build the demo upstream.

    Args:
        idp: The authorization server whose tokens ``/api/data`` accepts.
        jwks_url: The broker's ``/.well-known/jwks.json``.
        audience: The audience delegated download tokens must carry.

    Returns:
        The ASGI app.
    """
    app = FastAPI(title="demo upstream", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/api/data")
    async def data(request: Request) -> JSONResponse:
        header = request.headers.get("authorization", "")
        async with httpx.AsyncClient() as client:
            verdict = await client.get(idp.resource_url, headers={"Authorization": header})
        if verdict.status_code != 200:
            return JSONResponse(
                {"error": "invalid_token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return JSONResponse({"data": [1, 2, 3], "caller": verdict.json().get("subject")})

    @app.get("/download/{path:path}")
    async def download(path: str, token: str = "") -> JSONResponse:
        try:
            claims = await _verify(jwks_url, token, audience)
        except (jwt.PyJWTError, httpx.HTTPError, KeyError, StopIteration):
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        if claims.get("obj") != path:
            return JSONResponse({"error": "wrong_object"}, status_code=403)
        return JSONResponse({"file": path, "bytes": 1234})

    return app


async def _verify(jwks_url: str, token: str, audience: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        jwks = (await client.get(jwks_url)).json()
    header = jwt.get_unverified_header(token)
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == header["kid"])
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=[key.algorithm_name], audience=audience
    )
    return claims
