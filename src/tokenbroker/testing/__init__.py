"""A real OAuth 2.0 authorization server for tests, built from authlib's server parts.

Install with the ``testing`` extra (``pip install tokenbroker[testing]``)::

    from tokenbroker.testing import AuthorizationServer, Fault

    server = AuthorizationServer(expires_in=3600, rotation="strict")
    server.add_client("id", "secret", scopes=["read"])
    with server:
        ...  # point a client at server.token_url
        assert server.count("client_credentials") == 1

The authorization-code grant (PKCE ``S256`` required) runs through real login and consent
pages; :func:`complete_authorization` drives them without a browser::

    server.add_account("alice", "pw")
    server.add_client("app", auth_method="none", scopes="openid offline_access",
                      redirect_uris=["http://127.0.0.1:8750/v1/oauth/callback"])
    redirect = complete_authorization(url, username="alice", password="pw")
"""

from tokenbroker.testing.authserver import AuthorizationServer
from tokenbroker.testing.browserless import AuthorizationFlowError, complete_authorization
from tokenbroker.testing.clientauth import decode_client_secret_basic
from tokenbroker.testing.faults import Fault
from tokenbroker.testing.messages import Headers
from tokenbroker.testing.recording import RefreshTokenUse, RequestRecord, refresh_token_fingerprint
from tokenbroker.testing.upstream_server import RecordingUpstream, UpstreamRecord

__all__ = [
    "AuthorizationFlowError",
    "AuthorizationServer",
    "Fault",
    "Headers",
    "RecordingUpstream",
    "RefreshTokenUse",
    "RequestRecord",
    "ServedProxy",
    "UpstreamRecord",
    "complete_authorization",
    "decode_client_secret_basic",
    "refresh_token_fingerprint",
]


def __getattr__(name: str) -> object:
    """``ServedProxy`` is imported on first use: it needs the 'server' extra."""
    if name == "ServedProxy":
        from tokenbroker.testing.served_proxy import ServedProxy  # noqa: PLC0415

        return ServedProxy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
