"""Provider settings for the test authorization server (imported by tests and conftest)."""

from __future__ import annotations

from typing import Any

from tokenbroker.testing import AuthorizationServer

CLIENT_ID = "svc-client"
CLIENT_SECRET = "svc-secret"


def client_credentials(server: AuthorizationServer, **overrides: Any) -> dict[str, Any]:
    """Provider settings for the server's client-credentials client."""
    return {
        "grant": "client_credentials",
        "token_url": server.token_url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scopes": ["read"],
        **overrides,
    }


def refresh_token(server: AuthorizationServer, seed: str, **overrides: Any) -> dict[str, Any]:
    """Provider settings for a refresh-token credential seeded with ``seed``."""
    return {
        "grant": "refresh_token",
        "token_url": server.token_url,
        "client_id": "rt-client",
        "refresh_token": seed,
        **overrides,
    }


def login(server: AuthorizationServer, **overrides: Any) -> dict[str, Any]:
    """Provider settings for the server's login endpoint with both accounts."""
    return {
        "grant": "login",
        "login_url": server.login_url,
        "token_path": "data.token",
        "credentials": [
            {"username": "alice", "password": "alice-pw"},
            {"username": "bob", "password": "bob-pw"},
        ],
        **overrides,
    }
