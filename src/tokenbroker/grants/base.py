"""What every grant shares: the reply and token types, client authentication, reply parsing.

No I/O here (STYLE 3). Each grant turns settings (and, for refresh, the current
refresh token) into an :class:`httpx.Request`, and a provider's :class:`Reply` into
a :class:`TokenResponse` or a classified :class:`~tokenbroker.errors.ProviderError`.
A fresh request is built for every attempt, so ``private_key_jwt`` assertions get a
fresh ``jti`` on retries too (RFC 7523 §3).
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote_plus

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ..config import ClientCredentialsProvider, RefreshTokenProvider
from ..core.names import OAUTH_ERROR_CODE
from ..core.secret import Secret
from ..core.token import Token
from ..errors import (
    ClientAuthenticationError,
    InvalidTokenError,
    ProviderError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
)

__all__ = [
    "KNOWN_ERROR_CODES",
    "Grant",
    "Reply",
    "TokenResponse",
    "basic_authorization",
    "retry_after",
    "token_at",
    "validate_token_value",
]

_TOKEN_VALUE = re.compile(r"[\x21-\x7e]{1,16384}\Z")
#: Error codes shown in messages; any other code may be provider junk (or a token) and is hidden.
KNOWN_ERROR_CODES = frozenset(
    {
        "access_denied",
        "consent_required",
        "expired_token",
        "insufficient_scope",
        "interaction_required",
        "invalid_client",
        "invalid_dpop_proof",
        "invalid_grant",
        "invalid_request",
        "invalid_scope",
        "invalid_target",
        "invalid_token",
        "login_required",
        "server_error",
        "slow_down",
        "temporarily_unavailable",
        "unauthorized_client",
        "unsupported_grant_type",
        "use_dpop_nonce",
    }
)
_MAX_LIFETIME = 366 * 86400.0
_MAX_RETRY_AFTER = 86400.0
# identity: a compressed reply could inflate far past the size cap before it is checked.
_ACCEPT = {"Accept": "application/json", "Accept-Encoding": "identity"}
_FORM = {"Content-Type": "application/x-www-form-urlencoded", **_ACCEPT}


@dataclass(frozen=True, slots=True)
class Reply:
    """A provider's reply, fully read (the driver caps its size).

    Attributes:
        status_code: HTTP status.
        headers: Response headers.
        content: The decoded body (not in the repr: it may hold tokens).
    """

    status_code: int
    headers: httpx.Headers
    content: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, repr=False)
class TokenResponse:
    """A successful token reply.

    Attributes:
        token: The access token for consumers (``expires_at`` relative to ``issued_at``).
        lifetime: Seconds the token lives, from the reply or the configured default.
        refresh_token: A new refresh token, when the provider rotated it.
        raw: The provider's raw reply (stored encrypted by the refresh protocol; never logged).
        issued_at: Wall-clock time the token was obtained, when it came from the store
            (the cache then schedules its refresh from that time, not from now).
    """

    token: Token
    lifetime: float
    refresh_token: Secret | None = None
    raw: bytes = b""
    issued_at: float | None = None

    def __repr__(self) -> str:
        return f"TokenResponse(token={self.token!r}, lifetime={self.lifetime})"


class Grant(Protocol):
    """What the retry flow and its driver need from a grant."""

    provider: str

    def build_request(self) -> httpx.Request:
        """A new request for one attempt."""

    def parse_response(self, reply: Reply, issued_at: float) -> TokenResponse:
        """Turn a reply into a token or raise a classified error."""


def basic_authorization(client_id: str, client_secret: str) -> str:
    """The ``Authorization`` value for ``client_secret_basic`` (RFC 6749 §2.3.1).

    The id and secret are form-urlencoded *before* base64, so ``:``, ``%``,
    ``+`` and spaces survive.

    Args:
        client_id: The client identifier.
        client_secret: The client secret.

    Returns:
        ``Basic <base64>``.
    """
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def validate_token_value(value: object, *, provider: str, what: str) -> str:
    """Refuse a token that is not safe to put in a header (RFC 6750 b64token-ish).

    Args:
        value: The value from the reply.
        provider: For the error message.
        what: ``access_token`` or ``refresh_token``, for the error message.

    Returns:
        The value, unchanged.

    Raises:
        InvalidTokenError: On a non-string or any CR, LF, NUL, space or non-visible-ASCII
            character.
    """
    if not isinstance(value, str) or not _TOKEN_VALUE.match(value):
        raise InvalidTokenError(
            f"{provider}: the provider's {what} is not a valid token value", provider=provider
        )
    return value


class _OAuthGrant:
    """Shared client authentication and RFC 6749 §5 reply handling."""

    grant_type = ""

    def __init__(
        self, provider: str, settings: ClientCredentialsProvider | RefreshTokenProvider
    ) -> None:
        self.provider = provider
        self.settings = settings
        self._key: Any = None
        if settings.client_auth == "private_key_jwt" and settings.private_key is not None:
            self._key = load_pem_private_key(settings.private_key.reveal().encode(), None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r})"

    def _request(self, form: dict[str, str]) -> httpx.Request:
        settings = self.settings
        headers = dict(_FORM)
        method = settings.client_auth
        if method == "client_secret_basic" and settings.client_secret is not None:
            headers["Authorization"] = basic_authorization(
                settings.client_id, settings.client_secret.reveal()
            )
        elif method == "client_secret_post" and settings.client_secret is not None:
            form["client_id"] = settings.client_id
            form["client_secret"] = settings.client_secret.reveal()
        elif method == "private_key_jwt":
            form["client_id"] = settings.client_id
            form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            form["client_assertion"] = self._assertion()
        else:
            form["client_id"] = settings.client_id
        return httpx.Request("POST", settings.token_url, headers=headers, data=form)

    def _assertion(self) -> str:
        """A client assertion JWT (RFC 7523 §3): fresh ``jti``, ``exp`` 60 s ahead."""
        # The provider checks iat/exp against its real clock, so an injected (fake) clock
        # would only make it reject the assertion: this one read is the system's.
        now = int(time.time())
        settings = self.settings
        claims = {
            "iss": settings.client_id,
            "sub": settings.client_id,
            "aud": settings.assertion_audience or settings.token_url,
            "jti": uuid.uuid4().hex + secrets.token_hex(4),
            "iat": now,
            "exp": now + 60,
        }
        return jwt.encode(claims, self._key, algorithm=settings.signing_alg or _alg(self._key))

    def parse_response(self, reply: Reply, issued_at: float) -> TokenResponse:
        """Parse a token endpoint reply (RFC 6749 §5.1, §5.2).

        Args:
            reply: The provider's reply.
            issued_at: Wall-clock time the request was sent; ``expires_at`` counts from it.

        Returns:
            The token response.

        Raises:
            ProviderError: The classified failure (see :mod:`tokenbroker.errors`).
        """
        body = _json_object(reply)
        if not 200 <= reply.status_code < 300:
            raise self._classify(reply, body)
        if body is None:
            raise ProviderUnavailableError(
                f"{self.provider}: malformed token reply (not a JSON object)",
                provider=self.provider,
                status_code=reply.status_code,
            )
        if "access_token" not in body:
            raise ProviderUnavailableError(
                f"{self.provider}: token reply has no access_token",
                provider=self.provider,
                status_code=reply.status_code,
            )
        access = validate_token_value(
            body["access_token"], provider=self.provider, what="access_token"
        )
        refresh = body.get("refresh_token")
        new_refresh = None
        if refresh is not None:
            new_refresh = Secret(
                validate_token_value(refresh, provider=self.provider, what="refresh_token")
            )
        lifetime = _lifetime(body.get("expires_in"), self.settings.default_expires_in)
        scope = body.get("scope")
        token = Token(
            access_token=access,
            token_type=_token_type(body.get("token_type"), self.provider),
            expires_at=issued_at + lifetime,
            scope=scope if isinstance(scope, str) else None,
        )
        return TokenResponse(
            token=token, lifetime=lifetime, refresh_token=new_refresh, raw=reply.content
        )

    def _classify(self, reply: Reply, body: dict[str, Any] | None) -> ProviderError:
        status = reply.status_code
        raw_code = body.get("error") if body else None
        code = raw_code if isinstance(raw_code, str) and OAUTH_ERROR_CODE.match(raw_code) else None
        shown = code if code in KNOWN_ERROR_CODES or code in self._reauth else None
        where = f"{self.provider}: token endpoint answered {status}" + (
            f" ({shown})" if shown else ""
        )
        kw: dict[str, Any] = {"provider": self.provider, "status_code": status, "error_code": shown}
        if status == 429 or status >= 500:
            return _unavailable(where, reply, kw)
        if self._is_reauthorization(status, code):
            return ReauthorizationRequiredError(where, **kw)
        if status in (401, 403) or code == "invalid_client":
            return ClientAuthenticationError(where, **kw)
        return ProviderMisconfiguredError(where, **kw)

    def _is_reauthorization(self, status: int, code: str | None) -> bool:
        return False

    @property
    def _reauth(self) -> frozenset[str]:
        return frozenset()


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date, RFC 9110 §10.2.3).

    Args:
        headers: Response headers.

    Returns:
        Seconds between 0 and one day, or None when absent or unparseable.
    """
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,12}", value):
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # An HTTP-date is on the server's real wall clock: compare it with ours, not a fake one.
    return min(max(0.0, when - time.time()), _MAX_RETRY_AFTER)


def token_at(reply: Reply, path: str, where: str, provider: str) -> tuple[Any, str]:
    """Classify a plain (non-OAuth) token reply and take the token at a dotted path.

    Args:
        reply: The reply.
        path: Dotted path of the token in the JSON body (list indexes allowed).
        where: Message prefix, e.g. ``db: login for account 'alice'``.
        provider: The provider name.

    Returns:
        The parsed body (None if not JSON) and the validated token.

    Raises:
        ProviderError: 429/5xx or no token → unavailable; 401/403 → client authentication;
            other non-2xx → misconfigured; a bad token value → :class:`InvalidTokenError`.
    """
    status = reply.status_code
    kw: dict[str, Any] = {"provider": provider, "status_code": status}
    where = f"{where} answered {status}"
    if status == 429 or status >= 500:
        raise _unavailable(where, reply, kw)
    if status in (401, 403):
        raise ClientAuthenticationError(where, **kw)
    if not 200 <= status < 300:
        raise ProviderMisconfiguredError(where, **kw)
    body = _json_object(reply)
    value = _dig(body, path)
    if value is None:
        raise ProviderUnavailableError(f"{where} without a token", **kw)
    return body, validate_token_value(value, provider=provider, what="access_token")


def _unavailable(where: str, reply: Reply, kw: dict[str, Any]) -> ProviderUnavailableError:
    """A 429, or a 503 with ``Retry-After``, says the request was not processed; other 5xx may
    have been (in doubt)."""
    delay = retry_after(reply.headers)
    processed = not (reply.status_code == 429 or (reply.status_code == 503 and delay is not None))
    return ProviderUnavailableError(where, retry_after=delay, sent=processed, **kw)


def _json_object(reply: Reply) -> dict[str, Any] | None:
    try:
        body = json.loads(reply.content)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _lifetime(value: object, default: float) -> float:
    if isinstance(value, bool) or value is None:
        return default
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return default
    if isinstance(value, int):  # may exceed float range
        return float(min(max(value, 1), int(_MAX_LIFETIME)))
    if not isinstance(value, float) or not math.isfinite(value):
        return default
    return min(max(float(value), 1.0), _MAX_LIFETIME)


def _token_type(value: object, provider: str) -> str:
    if value is None:
        return "Bearer"
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", value):
        raise InvalidTokenError(f"{provider}: token_type is not valid", provider=provider)
    return "Bearer" if value.lower() == "bearer" else value


def _dig(body: Any, path: str) -> Any:
    node = body
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _fill(node: Any, values: dict[str, str]) -> Any:
    """Replace ``{name}`` placeholders (keys of ``values`` include the braces) in one pass."""
    if isinstance(node, str):
        return re.sub(r"\{[a-z_]+\}", lambda m: values.get(m.group(0), m.group(0)), node)
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    return node


def _alg(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError("unsupported private key type for private_key_jwt")
