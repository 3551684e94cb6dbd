"""Request and response schemas of the HTTP API (what the OpenAPI document shows).

No response schema has a refresh-token field; token responses are built by
:mod:`tokenbroker.api.routes` with ``Cache-Control: no-store``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "SCOPE_PATTERN",
    "DelegationIn",
    "DelegationOut",
    "ErrorBody",
    "ErrorResponse",
    "InvalidateIn",
    "InvalidateOut",
    "ProviderOut",
    "ProvidersOut",
    "Status",
    "TokenOut",
]

#: A request's scope: RFC 6749 §3.3 scope-tokens separated by spaces; blank for the configured
#: scopes (:mod:`tokenbroker.core.scopes` normalises it).
SCOPE_PATTERN = r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$"


class ErrorBody(BaseModel):
    """``{"code", "message"}`` inside every error response."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every error response: ``{"error": {"code", "message"}}``."""

    error: ErrorBody


class TokenOut(BaseModel):
    """An access token for a consumer; never a refresh token."""

    model_config = ConfigDict(extra="forbid")

    access_token: str
    token_type: str
    expires_at: int = Field(description="Unix seconds when the provider says it expires.")
    expires_in: int = Field(description="Seconds left.")
    scope: str | None = None


class InvalidateIn(BaseModel):
    """The token an upstream rejected, and which token key it came from."""

    model_config = ConfigDict(extra="forbid")

    access_token: str = Field(min_length=1, max_length=16384)
    scope: str | None = Field(None, max_length=1024, pattern=SCOPE_PATTERN)
    account: str | None = Field(None, max_length=256)


class InvalidateOut(TokenOut):
    """The current token after the report, and whether the reported one was dropped."""

    invalidated: bool


class ProviderOut(BaseModel):
    """A provider the consumer may use, and its state; no secrets."""

    name: str
    grant: str
    state: str
    valid_until: int | None = None
    last_refresh: int | None = None
    last_error: str | None = None


class ProvidersOut(BaseModel):
    """The providers this consumer may use."""

    providers: list[ProviderOut]


class DelegationIn(BaseModel):
    """What a delegated token is for."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(max_length=64)
    audience: str = Field(max_length=2048)
    object: str | None = Field(None, max_length=2048)
    subject: str | None = Field(None, max_length=256)
    lifetime_seconds: int | None = Field(None, ge=1, le=86400)


class DelegationOut(BaseModel):
    """A short-lived delegated token; never cached, never refreshable."""

    model_config = ConfigDict(extra="forbid")

    token: str
    token_type: str
    expires_at: int
    expires_in: int
    audience: str
    object: str | None = None


class Status(BaseModel):
    """A probe's answer."""

    status: str
    store: str | None = None
    providers: dict[str, str] | None = None
    #: Parts the broker runs without, with the reason (``{"redis": "redis unreachable: …"}``).
    degraded: dict[str, str] | None = None
