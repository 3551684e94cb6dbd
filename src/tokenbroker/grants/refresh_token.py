"""The refresh token grant (RFC 6749 §6), for single-use rotating refresh tokens too."""

from __future__ import annotations

import httpx

from ..config import RefreshTokenProvider
from ..core.secret import Secret
from .base import _OAuthGrant

__all__ = ["RefreshTokenGrant"]


class RefreshTokenGrant(_OAuthGrant):
    """Refresh token grant (RFC 6749 §6); the refresh token is read at each attempt.

    Args:
        provider: The provider's name.
        settings: Its settings.
        refresh_token: A callable returning the current refresh token.
    """

    grant_type = "refresh_token"

    def __init__(
        self,
        provider: str,
        settings: RefreshTokenProvider,
        refresh_token: Secret,
    ) -> None:
        super().__init__(provider, settings)
        self.refresh_token = refresh_token
        self._reauth_codes = frozenset(settings.reauthorization_errors)

    def build_request(self) -> httpx.Request:
        """A new refresh request with the current refresh token.

        Returns:
            The POST to the token endpoint.
        """
        form = {"grant_type": "refresh_token", "refresh_token": self.refresh_token.reveal()}
        if self.settings.scopes:
            form["scope"] = " ".join(self.settings.scopes)
        return self._request(form)

    @property
    def _reauth(self) -> frozenset[str]:
        return self._reauth_codes

    def _is_reauthorization(self, status: int, code: str | None) -> bool:
        return code in self._reauth_codes and status in (400, 401, 403)
