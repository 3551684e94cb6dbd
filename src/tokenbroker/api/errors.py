"""The HTTP API's errors and their one renderer (STYLE 7).

The API raises its own request errors (:class:`Unauthorized`, :class:`RateLimited`,
:class:`InvalidRequest`, :class:`NotFound`) beside the domain's
(:mod:`tokenbroker.errors`); :func:`error_response` turns any of them into an answer
through one table, :data:`ERROR_STATUS`: the API's own rows, then
:data:`tokenbroker.edge.statuses.ERROR_STATUS`, which the proxy and BrokerClient share.
Every error answer is ``{"error": {"code", "message"}}`` with ``Cache-Control: no-store``;
messages are fixed sentences, never an exception's text.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..edge.statuses import ERROR_STATUS as DOMAIN_ERROR_STATUS
from ..edge.statuses import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    NOT_FOUND,
    RATE_LIMITED,
    UNAUTHORIZED,
    ErrorStatus,
    retry_after,
)
from ..errors import TokenBrokerError
from .models import ErrorResponse

__all__ = [
    "ERROR_STATUS",
    "NO_STORE",
    "InvalidRequest",
    "NotFound",
    "RateLimited",
    "Unauthorized",
    "add_error_handlers",
    "documented",
    "error_code",
    "error_json",
    "error_response",
]

logger = logging.getLogger("tokenbroker.app")

#: Headers of every answer that carries a token or an error.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
REALM = 'Bearer realm="tokenbroker"'


class Unauthorized(TokenBrokerError):
    """No valid consumer key was presented."""

    def __init__(self, presented: bool) -> None:
        super().__init__("a valid API key is required")
        self.presented = presented


class RateLimited(TokenBrokerError):
    """Too many requests (or failed key checks); ``retry_after`` says how long to wait."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many requests")
        self.retry_after = retry_after


class InvalidRequest(TokenBrokerError):
    """The request's parameters are malformed."""


class NotFound(TokenBrokerError):
    """The provider does not exist or the consumer may not use it (indistinguishable)."""


#: Error → answer: the API's own request errors, then the table shared with the proxy and
#: BrokerClient (:mod:`tokenbroker.edge.statuses`). The first matching class wins.
ERROR_STATUS: tuple[tuple[type[Exception], ErrorStatus], ...] = (
    (Unauthorized, UNAUTHORIZED),
    (RateLimited, RATE_LIMITED),
    (InvalidRequest, INVALID_REQUEST),
    (NotFound, NOT_FOUND),
    *DOMAIN_ERROR_STATUS,
)


def _status(exc: BaseException) -> ErrorStatus | None:
    return next((row for kind, row in ERROR_STATUS if isinstance(exc, kind)), None)


def error_code(exc: BaseException) -> str:
    """The code :func:`error_response` answers ``exc`` with (``internal_error`` if unmapped)."""
    return (_status(exc) or INTERNAL_ERROR).code


def error_response(exc: BaseException) -> JSONResponse:
    """The response for an error, from :data:`ERROR_STATUS` (500 ``internal_error`` if unmapped).

    A 401 carries ``WWW-Authenticate`` (``error="invalid_token"`` when a key was presented);
    rows that say so carry ``Retry-After``.
    """
    row = _status(exc)
    if row is None:
        logger.error("unmapped error %s", type(exc).__name__)
        row = INTERNAL_ERROR
    headers: dict[str, str] = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = f'{REALM}, error="invalid_token"' if exc.presented else REALM
    if row.retry_after:
        headers["Retry-After"] = str(retry_after(exc))
    message = str(exc) if row.detailed else row.message
    return error_json(row.status, row.code, message, headers)


def error_json(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The house error answer: ``{"error": {"code", "message"}}``, no-store, plus ``headers``."""
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=status,
        headers={**NO_STORE, **(headers or {})},
    )


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` saying each of ``statuses`` answers with the error body."""
    return {status: {"model": ErrorResponse} for status in statuses}


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error the app meets with the house error body: domain errors through
    :func:`error_response`, invalid input as 400 ``invalid_request`` naming the fields (not
    FastAPI's 422), unknown routes as 404 ``not_found`` and wrong methods as 405."""

    @app.exception_handler(TokenBrokerError)
    async def domain_error(request: Request, exc: TokenBrokerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = sorted({".".join(str(p) for p in e["loc"][1:]) for e in exc.errors()})
        message = "invalid request: " + ", ".join(f or "body" for f in fields)
        return error_json(400, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_json(404, "not_found", "no such route")
        if exc.status_code == 405:
            return error_json(405, "method_not_allowed", "method not allowed")
        return error_json(exc.status_code, "http_error", "request failed")
