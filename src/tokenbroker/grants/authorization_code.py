"""The authorization-code grant with PKCE (RFC 6749 §4.1, RFC 7636): the request a person's
browser is sent to, and the code exchange. No I/O.

:func:`pkce_pair` makes a verifier and its ``S256`` challenge (never ``plain``, RFC 9700
§2.1.1); :func:`authorization_request_url` builds the authorization request (§4.1.1);
:class:`AuthorizationCodeGrant` exchanges the code (§4.1.3) with the provider's client
authentication and parses the reply like every grant (§5.1, §5.2).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping, Sequence
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

from ..config import RefreshTokenProvider
from ..core.secret import Secret
from .base import _OAuthGrant

__all__ = ["AuthorizationCodeGrant", "authorization_request_url", "pkce_challenge", "pkce_pair"]


def pkce_challenge(verifier: str) -> str:
    """The ``S256`` code challenge of ``verifier`` (RFC 7636 §4.2):
    ``BASE64URL(SHA256(ASCII(verifier)))`` without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def pkce_pair() -> tuple[str, str]:
    """A fresh code verifier (64 URL-safe characters, 384 random bits; RFC 7636 §4.1 asks
    for 43-128) and its ``S256`` challenge."""
    verifier = secrets.token_urlsafe(48)
    return verifier, pkce_challenge(verifier)


def authorization_request_url(
    endpoint: str,
    *,
    client_id: str,
    redirect_uri: str,
    scopes: Sequence[str],
    state: str,
    challenge: str,
    params: Mapping[str, str] | None = None,
) -> str:
    """The authorization request (RFC 6749 §4.1.1) with PKCE ``S256`` (RFC 7636 §4.3).

    Args:
        endpoint: The authorization endpoint (its own query is kept, §3.1).
        client_id: The client identifier.
        redirect_uri: The registered redirection URI, exactly.
        scopes: The scopes asked for.
        state: The single-use value binding the answer to this request (§10.12).
        challenge: The ``S256`` code challenge.
        params: Extra parameters (``prompt``); they cannot replace the ones above.

    Returns:
        The URL to send the person's browser to.
    """
    query = {**(params or {})}
    query.update(
        response_type="code",
        client_id=client_id,
        redirect_uri=redirect_uri,
        state=state,
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    if scopes:
        query["scope"] = " ".join(scopes)
    parts = urlsplit(endpoint)
    joined = "&".join(q for q in (parts.query, urlencode(query)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, ""))


class AuthorizationCodeGrant(_OAuthGrant):
    """The code exchange (RFC 6749 §4.1.3) with the PKCE verifier (RFC 7636 §4.5).

    Args:
        provider: The provider's name.
        settings: Its settings (token URL, client authentication).
        code: The authorization code from the callback.
        verifier: The PKCE code verifier of the request that obtained it.
        redirect_uri: The redirection URI sent in that request.
    """

    grant_type = "authorization_code"

    def __init__(
        self,
        provider: str,
        settings: RefreshTokenProvider,
        code: Secret,
        verifier: Secret,
        redirect_uri: str,
    ) -> None:
        super().__init__(provider, settings)
        self.code = code
        self.verifier = verifier
        self.redirect_uri = redirect_uri

    def build_request(self) -> httpx.Request:
        """The POST to the token endpoint.

        Returns:
            The request (form-encoded, with the client's authentication).
        """
        form = {
            "grant_type": "authorization_code",
            "code": self.code.reveal(),
            "redirect_uri": self.redirect_uri,
            "code_verifier": self.verifier.reveal(),
        }
        return self._request(form)
