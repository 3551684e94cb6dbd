"""Authorization server metadata of the test authorization server (RFC 8414).

The same document is served at the RFC 8414 path and at the OpenID Connect discovery path,
where clients configured with an ``issuer`` look first. The server issues no ID tokens,
so it is not an OpenID provider; the document advertises only what it does.
"""

from __future__ import annotations

from tokenbroker.testing.clientauth import TOKEN_AUTH_METHODS

__all__ = ["DISCOVERY_PATHS", "metadata"]

#: Where the document is served.
DISCOVERY_PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")


def metadata(issuer: str, authorization_endpoint: str, token_endpoint: str) -> dict[str, object]:
    """Build the metadata document (RFC 8414 §2).

    Args:
        issuer: The issuer identifier, also sent as ``iss`` on every authorization response.
        authorization_endpoint: The authorization endpoint URL.
        token_endpoint: The token endpoint URL.

    Returns:
        The document, with ``code_challenge_methods_supported: ["S256"]`` (RFC 7636 §6.2,
        ``plain`` refused) and ``authorization_response_iss_parameter_supported: true``
        (RFC 9207 §3).
    """
    return {
        "issuer": issuer,
        "authorization_endpoint": authorization_endpoint,
        "token_endpoint": token_endpoint,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": list(TOKEN_AUTH_METHODS),
        "authorization_response_iss_parameter_supported": True,
    }
