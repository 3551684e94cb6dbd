"""The client credentials grant (RFC 6749 §4.4)."""

from __future__ import annotations

import httpx

from ..config import ClientCredentialsProvider
from .base import _OAuthGrant

__all__ = ["ClientCredentialsGrant"]


class ClientCredentialsGrant(_OAuthGrant):
    """Client credentials grant (RFC 6749 §4.4).

    Args:
        provider: The provider's name.
        settings: Its settings.
        scopes: The scopes to ask for (already normalised).
    """

    grant_type = "client_credentials"

    def __init__(
        self, provider: str, settings: ClientCredentialsProvider, scopes: tuple[str, ...]
    ) -> None:
        super().__init__(provider, settings)
        self.scopes = scopes

    def build_request(self) -> httpx.Request:
        """A new token request (RFC 6749 §4.4.2).

        Returns:
            The POST to the token endpoint.
        """
        form = {"grant_type": "client_credentials"}
        if self.scopes:
            form["scope"] = " ".join(self.scopes)
        if self.settings.audience:
            form["audience"] = self.settings.audience
        return self._request(form)
