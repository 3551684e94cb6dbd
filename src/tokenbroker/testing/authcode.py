"""The authorization-code grant with PKCE of the test authorization server. No I/O.

* :class:`AuthorizationCodeGrant` subclasses authlib's grant (RFC 6749 §4.1) with the
  behaviour of a real server (oidc-provider): a code works once, and a replay revokes what
  it issued (RFC 6749 §4.1.2); the tokens' family is born with the code.
* :class:`S256CodeChallenge` subclasses authlib's PKCE extension (RFC 7636) to require a
  challenge on every authorization request and accept only ``S256`` (RFC 9700 §2.1.1).
* :class:`CodeStore` keeps the codes, behind one lock.

A refresh token is issued only when the granted scope holds ``offline_access``, which
survives only an authorization request with ``prompt=consent`` (OpenID Connect Core
§11, as oidc-provider applies it).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from typing import Any

from authlib.oauth2.rfc6749 import AuthorizationCodeGrant as _AuthlibCodeGrant
from authlib.oauth2.rfc6749 import InvalidGrantError, InvalidRequestError
from authlib.oauth2.rfc7636 import CodeChallenge

from tokenbroker.testing.clientauth import TOKEN_AUTH_METHODS

from .models import AuthorizationCode
from .records import TokenStore

__all__ = ["OFFLINE_ACCESS", "AuthorizationCodeGrant", "CodeStore", "S256CodeChallenge"]

#: The scope that asks for a refresh token.
OFFLINE_ACCESS = "offline_access"


class S256CodeChallenge(CodeChallenge):  # type: ignore[misc]
    """PKCE (RFC 7636) required on every authorization request, ``S256`` only.

    authlib's extension lets a request without a challenge through and defaults an absent
    method to ``plain``; this one refuses both, with ``invalid_request`` redirected to the
    client (RFC 7636 §4.4.1).
    """

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: missing 'code_challenge'.")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("Unsupported 'code_challenge_method': only S256.")
        super().validate_code_challenge(grant, redirect_uri)


class CodeStore:
    """Thread-safe registry of authorization codes."""

    def __init__(self, tokens: TokenStore, *, ttl_seconds: float) -> None:
        """Create an empty registry.

        Args:
            tokens: Creates and revokes the families of the codes' tokens.
            ttl_seconds: How long a code may be exchanged after it was issued.
        """
        self._tokens = tokens
        self._ttl = ttl_seconds
        self._lock = threading.Lock()
        self._codes: dict[str, AuthorizationCode] = {}
        self.issued = 0

    @property
    def clock(self) -> Callable[[], float]:
        """The token store's clock."""
        return self._tokens.clock

    def save(self, value: str, request: Any) -> AuthorizationCode:
        """Record a code authlib generated for a consented authorization request.

        Args:
            value: The code.
            request: authlib's validated ``OAuth2Request`` (``client``, ``user``,
                ``scope`` and the original parameters in ``payload``).

        Returns:
            The record.
        """
        data = request.payload.data
        scope = request.scope or ""
        if "consent" not in str(data.get("prompt") or "").split():
            scope = " ".join(s for s in scope.split() if s != OFFLINE_ACCESS)
        code = AuthorizationCode(
            value=value,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=scope,
            subject=str(request.user),
            code_challenge=str(data["code_challenge"]),
            code_challenge_method=str(data["code_challenge_method"]),
            expires_at=self.clock() + self._ttl,
            family=self._tokens.new_family(),
        )
        with self._lock:
            self._codes[value] = code
            self.issued += 1
        return code

    def find(self, value: str, client_id: str) -> AuthorizationCode | None:
        """Look up a code presented by a client; a replay revokes what it issued.

        Args:
            value: The presented code.
            client_id: The authenticated client.

        Returns:
            The unused, unexpired code issued to that client, or ``None``.
        """
        with self._lock:
            code = self._codes.get(value)
        if code is None or code.client_id != client_id:
            return None
        if code.used:
            self._tokens.revoke_family(code.family)
            return None
        if self.clock() >= code.expires_at:
            return None
        return code

    def consume(self, code: AuthorizationCode) -> bool:
        """Atomically spend a code; the loser of a race revokes what the winner issued.

        Args:
            code: A record returned by :meth:`find`.

        Returns:
            True for its first use.
        """
        with self._lock:
            first, code.used = not code.used, True
        if not first:
            self._tokens.revoke_family(code.family)
        return first


class AuthorizationCodeGrant(_AuthlibCodeGrant):  # type: ignore[misc]
    """RFC 6749 §4.1 over a :class:`CodeStore` (the server's ``codes`` attribute).

    The code is spent at the end of validation, after client authentication, the
    ``redirect_uri`` comparison and the PKCE verifier check, so a failed attempt leaves it
    usable and two concurrent exchanges cannot both succeed.
    """

    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def generate_authorization_code(self) -> str:
        return secrets.token_urlsafe(32)

    def save_authorization_code(self, code: str, request: Any) -> None:
        self.server.codes.save(code, request)

    def query_authorization_code(self, code: str, client: Any) -> AuthorizationCode | None:
        found: AuthorizationCode | None = self.server.codes.find(code, client.client_id)
        return found

    def validate_token_request(self) -> None:
        super().validate_token_request()
        if not self.server.codes.consume(self.request.authorization_code):
            raise InvalidGrantError("Invalid 'code' in request.")

    def delete_authorization_code(self, authorization_code: Any) -> None:
        """Nothing to do: the code was spent in :meth:`validate_token_request`."""

    def authenticate_user(self, authorization_code: Any) -> str:
        subject: str = authorization_code.subject
        return subject

    def generate_token(
        self,
        user: Any = None,
        scope: str | None = None,
        grant_type: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        offline = OFFLINE_ACCESS in (scope or "").split()
        token: dict[str, Any] = super().generate_token(
            user=user,
            scope=scope,
            grant_type=grant_type,
            expires_in=expires_in,
            include_refresh_token=include_refresh_token and offline,
        )
        return token
