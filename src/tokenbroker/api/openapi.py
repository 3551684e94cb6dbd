"""The API's OpenAPI document: what FastAPI generates, corrected to say what the app does,
and served at ``/openapi.json`` to consumers with a key only (it maps every route and
parameter)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from .access import consumer

__all__ = ["add_document_route", "document_errors"]


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what the app does: invalid input is a 400 with our error
    body (not FastAPI's 422), and any route may answer 413 or 429."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        error = {"$ref": "#/components/schemas/ErrorResponse"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                had_body = responses.pop("422", None) is not None
                if had_body:
                    responses["400"] = _described("Invalid request", error)
                    responses["413"] = _described("Request body too large", error)
                if "401" in responses:
                    responses["429"] = _described("Too many requests", error)
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_document_route(app: FastAPI) -> None:
    """Serve ``app``'s OpenAPI document at ``/openapi.json``, behind a consumer key."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(consumer)])
    async def openapi_document() -> JSONResponse:
        """The OpenAPI document, for consumers only: it maps every route and parameter."""
        return JSONResponse(app.openapi())


def _described(description: str, ref: dict[str, str]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref}}}
