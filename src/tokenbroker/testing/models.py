"""The records of the test authorization server: clients and tokens.

They implement the duck-typed model interfaces authlib's grants and validators call
(``ClientMixin`` and ``TokenMixin`` from ``authlib.oauth2.rfc6749.models``). Mutable fields
are only changed by :class:`~tokenbroker.testing.records.TokenStore` under its lock.

A refresh-token *family* is everything descended from one seed: the seed, each rotated
successor, and every access token issued by refreshing any of them.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["AuthorizationCode", "BearerToken", "Client", "Family", "RefreshToken", "equal_secrets"]


def equal_secrets(a: str, b: str) -> bool:
    """Compare two secrets in constant time.

    Args:
        a: One secret.
        b: The other.

    Returns:
        True when equal.
    """
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@dataclass(eq=False)
class Client:
    """A registered OAuth client (RFC 6749 §2), shaped like authlib's ``ClientMixin``.

    Attributes:
        client_id: The client identifier.
        secret: The client secret, or ``None`` for ``private_key_jwt`` and ``none``.
        auth_method: The one token-endpoint auth method it may use (RFC 7591 §2).
        scopes: The scopes it may be granted; also the default when none are requested.
        grant_types: The grant types it may use.
        public_key: The key verifying its ``private_key_jwt`` assertions (a joserfc key).
        redirect_uris: Its registered redirection endpoints (RFC 6749 §3.1.2), compared
            as exact strings.
    """

    client_id: str
    secret: str | None = field(repr=False)
    auth_method: str
    scopes: tuple[str, ...]
    grant_types: frozenset[str]
    public_key: Any = field(default=None, repr=False)
    redirect_uris: tuple[str, ...] = ()

    def get_client_id(self) -> str:
        """Return the client identifier.

        Returns:
            ``client_id``.
        """
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        """Return no default: every authorization request must name its redirect URI.

        Returns:
            None, so authlib refuses a request without ``redirect_uri`` on the server's own
            error page.
        """
        return None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        """Tell whether a redirect URI is registered, by exact string comparison.

        RFC 9700 §4.1.3 (OAuth 2.0 Security BCP): no prefix, wildcard or normalisation.

        Args:
            redirect_uri: The URI to check.

        Returns:
            True when it is one of ``redirect_uris``.
        """
        return redirect_uri in self.redirect_uris

    def check_response_type(self, response_type: str) -> bool:
        """Tell whether the client may use a response type (only ``code``).

        Args:
            response_type: The requested ``response_type``.

        Returns:
            True for ``code`` when the client may use the authorization-code grant.
        """
        return response_type == "code" and "authorization_code" in self.grant_types

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """Resolve the scope to grant (RFC 6749 §3.3).

        Args:
            scope: The space-separated requested scope, or ``None``/empty for the default.

        Returns:
            The scope to grant, or ``None`` (authlib answers ``invalid_scope``) when a
            requested scope is not registered for the client.
        """
        if not scope:
            return " ".join(self.scopes)
        requested = scope.split()
        if not set(requested) <= set(self.scopes):
            return None
        return " ".join(requested)

    def check_client_secret(self, client_secret: str) -> bool:
        """Compare a presented secret in constant time.

        Args:
            client_secret: The presented secret.

        Returns:
            True when it equals the registered secret.
        """
        return self.secret is not None and equal_secrets(self.secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        """Tell whether ``method`` is this client's registered auth method.

        Args:
            method: The authentication method that succeeded.
            endpoint: The endpoint name (``"token"``).

        Returns:
            True when the method is the registered one.
        """
        return method == self.auth_method

    def check_grant_type(self, grant_type: str) -> bool:
        """Tell whether the client may use a grant type.

        Args:
            grant_type: The requested ``grant_type``.

        Returns:
            True when it is registered for the client.
        """
        return grant_type in self.grant_types


@dataclass(eq=False)
class Family:
    """A refresh-token family: one seed and everything issued from it.

    Attributes:
        id: A small integer for log messages.
        revoked: Set once reuse was detected; every member is then dead.
    """

    id: int
    revoked: bool = False


@dataclass(eq=False)
class RefreshToken:
    """A refresh token (RFC 6749 §1.5), shaped like authlib's ``TokenMixin``.

    Attributes:
        value: The token string.
        client_id: The client it was issued to.
        scope: The scope it carries.
        family: Its family.
        used_at: Clock time of its first use, ``None`` while unused.
    """

    value: str = field(repr=False)
    client_id: str
    scope: str
    family: Family
    used_at: float | None = None

    def check_client(self, client: Client) -> bool:
        """Tell whether the token was issued to ``client``.

        Args:
            client: The authenticated client.

        Returns:
            True when the client ids match.
        """
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        """Return the scope originally granted.

        Returns:
            The space-separated scope.
        """
        return self.scope

    def is_revoked(self) -> bool:
        """Tell whether its family was revoked.

        Returns:
            True once the family is revoked.
        """
        return self.family.revoked


@dataclass(eq=False)
class BearerToken:
    """An access token or a login token accepted by the protected resource (RFC 6750).

    Attributes:
        value: The token string.
        subject: The client id (access tokens) or username (login tokens).
        scope: The granted scope (empty for login tokens).
        kind: ``"access"`` or ``"login"``.
        expires_at: Clock time it stops working, ``None`` for never.
        family: The refresh family it descends from, if any.
        clock: The store's clock.
        revoked: Set by an explicit revocation.
    """

    value: str = field(repr=False)
    subject: str
    scope: str
    kind: Literal["access", "login"]
    expires_at: float | None
    family: Family | None
    clock: Callable[[], float] = field(repr=False)
    revoked: bool = False

    def get_scope(self) -> str:
        """Return the granted scope.

        Returns:
            The space-separated scope.
        """
        return self.scope

    def is_expired(self) -> bool:
        """Tell whether the token's lifetime is over.

        Returns:
            True at or after ``expires_at``.
        """
        return self.expires_at is not None and self.clock() >= self.expires_at

    def is_revoked(self) -> bool:
        """Tell whether the token or its family was revoked.

        Returns:
            True when revoked directly or through its family.
        """
        return self.revoked or (self.family is not None and self.family.revoked)


@dataclass(eq=False)
class AuthorizationCode:
    """An authorization code (RFC 6749 §4.1.2) with its PKCE challenge (RFC 7636 §4.4).

    Shaped like authlib's ``AuthorizationCodeMixin``. The family is created with the code,
    so a replay can revoke every token the code issued, even one still being issued.

    Attributes:
        value: The code.
        client_id: The client it was issued to.
        redirect_uri: The redirect URI of the authorization request.
        scope: The granted scope (``offline_access`` only with ``prompt=consent``).
        subject: The account that logged in and consented.
        code_challenge: The PKCE challenge.
        code_challenge_method: Always ``S256``.
        expires_at: Clock time after which it is refused.
        family: The family of the tokens it issues.
        used: Set by its first successful exchange.
    """

    value: str = field(repr=False)
    client_id: str
    redirect_uri: str
    scope: str
    subject: str
    code_challenge: str = field(repr=False)
    code_challenge_method: str
    expires_at: float
    family: Family
    used: bool = False

    def get_redirect_uri(self) -> str:
        """Return the redirect URI the token request must repeat (RFC 6749 §4.1.3).

        Returns:
            ``redirect_uri``.
        """
        return self.redirect_uri

    def get_scope(self) -> str:
        """Return the granted scope.

        Returns:
            The space-separated scope.
        """
        return self.scope
