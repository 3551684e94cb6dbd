"""Username/password login to a plain JSON or form endpoint (not OAuth)."""

from __future__ import annotations

import httpx

from ..config import Credential, LoginProvider
from ..core.token import Token
from .base import _ACCEPT, Reply, TokenResponse, _dig, _fill, _lifetime, _token_type, token_at

__all__ = ["LoginGrant"]


class LoginGrant:
    """Username/password login to a JSON or form endpoint (e.g. DolphinDB ``/api/login``).

    Args:
        provider: The provider's name.
        settings: Its settings.
        credential: The account to log in.
    """

    def __init__(self, provider: str, settings: LoginProvider, credential: Credential) -> None:
        self.provider = provider
        self.settings = settings
        self.credential = credential

    def __repr__(self) -> str:
        return f"LoginGrant(provider={self.provider!r}, account={self.credential.username!r})"

    def build_request(self) -> httpx.Request:
        """The login POST with ``{username}``/``{password}`` filled in.

        Returns:
            The request.
        """
        template = self.settings.request
        values = {
            "{username}": self.credential.username,
            "{password}": self.credential.password.reveal(),
        }
        headers = dict(_ACCEPT)
        url = self.settings.login_url
        if template.json_body is not None:
            return httpx.Request(
                "POST", url, headers=headers, json=_fill(template.json_body, values)
            )
        form = {k: _fill(v, values) for k, v in (template.form or {}).items()}
        return httpx.Request("POST", url, headers=headers, data=form)

    def parse_response(self, reply: Reply, issued_at: float) -> TokenResponse:
        """Take the token from ``token_path``; lifetime from ``expires_in_path`` or ``ttl_seconds``.

        Args:
            reply: The login reply.
            issued_at: Wall-clock time the request was sent.

        Returns:
            The token response (never a refresh token).

        Raises:
            ProviderError: 401/403 → :class:`ClientAuthenticationError` (wrong password);
                5xx/429 or a reply without the token → :class:`ProviderUnavailableError`;
                other 4xx → :class:`ProviderMisconfiguredError`.
        """
        where = f"{self.provider}: login for account {self.credential.username!r}"
        body, access = token_at(reply, self.settings.token_path, where, self.provider)
        ttl = self.settings.ttl_seconds
        if self.settings.expires_in_path:
            ttl = _lifetime(_dig(body, self.settings.expires_in_path), ttl)
        token = Token(
            access_token=access,
            token_type=_token_type(self.settings.token_type, self.provider),
            expires_at=issued_at + ttl,
        )
        return TokenResponse(token=token, lifetime=ttl, raw=reply.content)
