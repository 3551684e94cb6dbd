"""A real OAuth 2.0 authorization server for tests, on 127.0.0.1.

:class:`AuthorizationServer` assembles the pieces: authlib's server components
(:mod:`~tokenbroker.testing.protocol`) over an in-memory store
(:mod:`~tokenbroker.testing.records`), served by the standard library
(:mod:`~tokenbroker.testing.transport`), with request recording
(:mod:`~tokenbroker.testing.recording`) and fault injection
(:mod:`~tokenbroker.testing.faults`) in front.

Endpoints:

* ``POST /oauth/token``: ``client_credentials`` (RFC 6749 §4.4), ``refresh_token``
  (RFC 6749 §6) and ``authorization_code`` with PKCE ``S256`` (RFC 6749 §4.1, RFC 7636).
* ``GET /authorize`` and its login and consent pages
  (:mod:`~tokenbroker.testing.interaction`); redirects carry ``iss`` (RFC 9207).
* ``GET /.well-known/oauth-authorization-server`` (RFC 8414) and the same document at
  ``/.well-known/openid-configuration``.
* ``POST /api/login``: DolphinDB-style username/password login.
* ``GET /api/resource``: a resource protected by bearer tokens (RFC 6750).
* ``GET /testing/refresh-tokens``: the server's own record of refresh-token use: each
  presented token by fingerprint (never its value), how often it arrived and what each
  presentation did (:meth:`AuthorizationServer.refresh_token_report`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Self

from tokenbroker.testing.background import Background
from tokenbroker.testing.clientauth import TOKEN_AUTH_METHODS, PublicKey, load_public_key
from tokenbroker.testing.discovery import DISCOVERY_PATHS, metadata
from tokenbroker.testing.faults import Fault, FaultQueue
from tokenbroker.testing.interaction import AUTHORIZE_PATH, AuthorizationEndpoint
from tokenbroker.testing.messages import Reply, Request
from tokenbroker.testing.models import Client
from tokenbroker.testing.protocol import OAuth2Server, ReuseError
from tokenbroker.testing.recording import (
    Recorder,
    RefreshTokenUse,
    RequestRecord,
    refresh_token_uses,
    request_record,
)
from tokenbroker.testing.transport import BackgroundServer

from .records import Rotation, TokenStore

__all__ = [
    "LOGIN_PATH",
    "REFRESH_REPORT_PATH",
    "RESOURCE_PATH",
    "TOKEN_PATH",
    "AuthorizationServer",
]

TOKEN_PATH = "/oauth/token"
LOGIN_PATH = "/api/login"
RESOURCE_PATH = "/api/resource"
REFRESH_REPORT_PATH = "/testing/refresh-tokens"
_ROUTES = {
    **dict.fromkeys(DISCOVERY_PATHS, ("GET",)),
    TOKEN_PATH: ("POST",),
    LOGIN_PATH: ("POST",),
    RESOURCE_PATH: ("GET", "POST"),
    REFRESH_REPORT_PATH: ("GET",),
}


class AuthorizationServer(Background):
    """An OAuth 2.0 authorization server and protected resource for tests.

    Configure it (clients, accounts, seeded refresh tokens) before or while it runs; use
    it as a context manager or call :meth:`start` and :meth:`stop`. All methods are
    thread-safe.
    """

    def __init__(
        self,
        *,
        expires_in: int | None = 3600,
        rotation: Rotation = "strict",
        reuse_grace_seconds: float = 0,
        reuse_error: ReuseError = "invalid_grant",
        login_ttl_seconds: float | None = 3600,
        jwt_leeway_seconds: int = 60,
        code_ttl_seconds: float = 60,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure a stopped server.

        Args:
            expires_in: Access-token lifetime in seconds, sent as ``expires_in``; ``None``
                omits it and the tokens never expire.
            rotation: Refresh-token policy: ``"strict"`` (single use; reuse revokes the
                family), ``"grace"`` (reuse within ``reuse_grace_seconds`` of the first
                use is honoured with a fresh successor), ``"non_rotating"`` (no successor
                is issued and the token stays valid).
            reuse_grace_seconds: The ``"grace"`` window.
            reuse_error: ``"invalid_grant"`` (400) or ``"login_required"`` (401, Tesla
                style) for a reused, revoked or unknown refresh token.
            login_ttl_seconds: Lifetime of login tokens; ``None`` for unlimited.
            jwt_leeway_seconds: Clock skew tolerated on ``private_key_jwt`` ``exp``,
                ``iat`` and ``nbf``.
            code_ttl_seconds: How long an authorization code may be exchanged.
            host: Address to bind.
            port: Port to bind; 0 picks a free one at each :meth:`start`.
            clock: Time source for token expiry and the grace window (not for JWT claims,
                which authlib checks against the real clock).

        Raises:
            ValueError: An option is out of range.
        """
        if reuse_error not in ("invalid_grant", "login_required"):
            raise ValueError("reuse_error must be 'invalid_grant' or 'login_required'")
        if expires_in is not None and expires_in <= 0:
            raise ValueError("expires_in must be positive (or None)")
        self._store = TokenStore(
            rotation=rotation,
            reuse_grace_seconds=reuse_grace_seconds,
            login_ttl_seconds=login_ttl_seconds,
            clock=clock,
        )
        self._oauth = OAuth2Server(
            self._store,
            token_url=lambda: self._base_url + TOKEN_PATH,
            expires_in=expires_in,
            reuse_error=reuse_error,
            jwt_leeway_seconds=jwt_leeway_seconds,
            code_ttl_seconds=code_ttl_seconds,
        )
        self._authorization = AuthorizationEndpoint(self._oauth, issuer=lambda: self._base_url)
        self._pages = self._authorization.routes()
        self._routes = {**_ROUTES, **{path: (method,) for path, (method, _) in self._pages.items()}}
        self._recorder = Recorder()
        self._faults = FaultQueue()
        self._latency = 0.0
        self._in_flight = 0
        self._max_in_flight = 0
        self._gauge = threading.Lock()
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._server: BackgroundServer | None = None
        # Kept after stop() so requests still in flight resolve the JWT audience.
        self._base_url = ""

    # -- configuration -------------------------------------------------------------------

    def add_client(
        self,
        client_id: str,
        secret: str | None = None,
        *,
        auth_method: str = "client_secret_basic",
        scopes: Iterable[str] | str = (),
        public_key: PublicKey | None = None,
        grant_types: Iterable[str] | None = None,
        redirect_uris: Iterable[str] = (),
    ) -> None:
        """Register (or replace) an OAuth client.

        Args:
            client_id: The client identifier; any characters.
            secret: The client secret, required for ``client_secret_basic`` and
                ``client_secret_post``.
            auth_method: ``client_secret_basic`` (RFC 6749 §2.3.1), ``client_secret_post``,
                ``private_key_jwt`` (RFC 7523 §2.2) or ``none`` (public client).
            scopes: Scopes it may be granted (a list or a space-separated string); all of
                them are granted when a request names none.
            public_key: For ``private_key_jwt``: a PEM public key, a JWK dict or a
                ``cryptography`` public key.
            grant_types: Grants it may use; default ``client_credentials`` and
                ``refresh_token`` (only ``refresh_token`` for ``none``), plus
                ``authorization_code`` when it has redirect URIs.
            redirect_uris: Its redirection endpoints for the authorization-code grant,
                matched exactly; add ``offline_access`` to ``scopes`` for refresh tokens.

        Raises:
            ValueError: Unknown auth method, or a missing secret or public key.
        """
        if auth_method not in TOKEN_AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {TOKEN_AUTH_METHODS}")
        if auth_method.startswith("client_secret_") and not secret:
            raise ValueError(f"{auth_method} needs a secret")
        if auth_method == "private_key_jwt" and public_key is None:
            raise ValueError("private_key_jwt needs public_key")
        uris = tuple(redirect_uris)
        if grant_types is None:
            public = auth_method == "none"
            grant_types = ("refresh_token",) if public else ("client_credentials", "refresh_token")
            if uris:
                grant_types = (*grant_types, "authorization_code")
        self._store.add_client(
            Client(
                client_id=client_id,
                secret=secret,
                auth_method=auth_method,
                scopes=tuple(scopes.split() if isinstance(scopes, str) else scopes),
                grant_types=frozenset(grant_types),
                public_key=load_public_key(public_key) if public_key is not None else None,
                redirect_uris=uris,
            )
        )

    def issue_refresh_token(self, client_id: str, scope: str | None = None) -> str:
        """Seed a refresh-token family, as if an earlier grant had issued it.

        Args:
            client_id: A registered client.
            scope: Space-separated scope; ``None`` for all of the client's scopes.

        Returns:
            The refresh token.

        Raises:
            KeyError: The client is unknown.
            ValueError: The scope is not registered for the client.
        """
        return self._store.seed_refresh(client_id, scope)

    def add_account(self, username: str, password: str) -> None:
        """Register (or replace) an account for the login endpoint.

        Args:
            username: The user name.
            password: The password.
        """
        self._store.add_account(username, password)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and start serving in a background thread.

        Returns:
            The server itself.

        Raises:
            RuntimeError: It is already running.
            OSError: The address cannot be bound.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the authorization server is already running")
            self._server = BackgroundServer(self._serve, self._host, self._port)
            self._base_url = self._server.url
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and wait for them; no-op when stopped."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.close()

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``.

        Returns:
            The URL of the running server.

        Raises:
            RuntimeError: The server is not running.
        """
        server = self._server
        if server is None:
            raise RuntimeError("the authorization server is not running; call start()")
        return server.url

    @property
    def token_url(self) -> str:
        """The token endpoint URL (``url + "/oauth/token"``), the JWT ``aud`` to use."""
        return self.url + TOKEN_PATH

    @property
    def login_url(self) -> str:
        """The login endpoint URL (``url + "/api/login"``)."""
        return self.url + LOGIN_PATH

    @property
    def resource_url(self) -> str:
        """The protected resource URL (``url + "/api/resource"``)."""
        return self.url + RESOURCE_PATH

    @property
    def issuer(self) -> str:
        """The issuer identifier (RFC 8414 §2): :attr:`url`, also sent as ``iss``."""
        return self.url

    @property
    def authorize_url(self) -> str:
        """The authorization endpoint URL (``url + "/authorize"``)."""
        return self.url + AUTHORIZE_PATH

    @property
    def authorization(self) -> AuthorizationEndpoint:
        """Test hooks: ``forge_next_iss()``, ``deny_next_consent()``, ``authorizations``."""
        return self._authorization

    # -- faults --------------------------------------------------------------------------

    def inject(self, fault: Fault, times: int | None = 1, path: str | None = TOKEN_PATH) -> None:
        """Queue a fault for the next matching requests (FIFO, one per request).

        Args:
            fault: What to do instead of (or before) answering.
            times: How many matching requests it applies to; ``None`` until
                :meth:`clear_faults`.
            path: The path it applies to (default: the token endpoint); ``None`` for any.

        Raises:
            ValueError: ``times`` is less than 1.
        """
        self._faults.push(fault, times, path)

    def clear_faults(self) -> None:
        """Disarm every queued fault."""
        self._faults.clear()

    @property
    def latency(self) -> float:
        """Extra seconds slept before answering every request (default 0)."""
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = float(seconds)

    # -- recording -----------------------------------------------------------------------

    def count(self, grant: str) -> int:
        """Count requests seen for a grant, faulted and failed ones included.

        Args:
            grant: ``"client_credentials"``, ``"refresh_token"`` or ``"login"``.

        Returns:
            The number since the last :meth:`reset_counts`.
        """
        return self._recorder.count(grant)

    def resource_count(self) -> int:
        """Count requests to the protected resource.

        Returns:
            The number since the last :meth:`reset_counts`.
        """
        return self._recorder.resource_count()

    def reset_counts(self) -> None:
        """Zero :meth:`count`, :meth:`resource_count` and :attr:`max_in_flight`."""
        self._recorder.reset_counts()
        with self._gauge:
            self._max_in_flight = self._in_flight

    @property
    def in_flight(self) -> int:
        """Requests being answered right now."""
        return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests answered at the same time since the last :meth:`reset_counts`."""
        return self._max_in_flight

    def reset_records(self) -> None:
        """Forget counts, presented refresh tokens, their report and :attr:`requests`."""
        self._recorder.reset()
        self._store.forget_outcomes()

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received, in arrival order (a copy)."""
        return self._recorder.requests

    @property
    def presented_refresh_tokens(self) -> list[str]:
        """Every refresh token presented to the token endpoint, in order (a copy)."""
        return self._recorder.presented_refresh_tokens

    def reused_refresh_tokens(self) -> set[str]:
        """Find refresh tokens presented more than once.

        Returns:
            The set of such tokens.
        """
        return self._recorder.reused_refresh_tokens()

    def refresh_token_report(self) -> list[RefreshTokenUse]:
        """The server's record of refresh-token use, as ``GET /testing/refresh-tokens`` serves it.

        A token presented twice is reported with ``presented == 2`` and the outcome of each
        presentation that reached the rotation policy (a resend inside the reuse grace is
        ``accepted_in_grace``; one outside it is ``reused``).

        Returns:
            One entry per presented token, by fingerprint, in order of first arrival.
        """
        return refresh_token_uses(
            self._recorder.presented_refresh_tokens,
            [(token, outcome.value) for token, outcome in self._store.refresh_outcomes()],
        )

    @property
    def issued_access_tokens(self) -> list[str]:
        """Access tokens issued by the token endpoint, oldest first (a copy)."""
        return self._store.issued("access")

    @property
    def issued_login_tokens(self) -> list[str]:
        """Tokens issued by the login endpoint, oldest first (a copy)."""
        return self._store.issued("login")

    def revoke_access_token(self, token: str) -> None:
        """Revoke an access or login token; the resource then answers 401 for it.

        Args:
            token: A token issued by this server.

        Raises:
            KeyError: The token was never issued here.
        """
        if not self._store.revoke_bearer(token):
            raise KeyError("unknown access token")

    def expire_all_access_tokens(self) -> int:
        """Expire every access token and login token issued so far.

        Returns:
            The number of tokens expired.
        """
        return self._store.expire_bearer(("access", "login"))

    # -- serving -------------------------------------------------------------------------

    def _serve(self, request: Request) -> Reply | None:
        with self._gauge:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            return self._answer(request)
        finally:
            with self._gauge:
                self._in_flight -= 1

    def _answer(self, request: Request) -> Reply | None:
        self._record(request)
        fault = self._faults.take(request.path)
        delay = self._latency + (fault.delay if fault is not None else 0.0)
        if delay:
            time.sleep(delay)
        if fault is not None:
            if fault.drop:
                return None
            canned = fault.reply()
            if canned is not None:
                return canned
        return self._route(request)

    def _route(self, request: Request) -> Reply:
        methods = self._routes.get(request.path)
        if methods is None:
            return Reply.json(404, {"error": "not_found"})
        if request.method not in methods:
            allow = ", ".join(methods)
            return Reply.json(405, {"error": "method_not_allowed"}, [("Allow", allow)])
        if request.path == TOKEN_PATH:
            return self._oauth.token_response(request)
        if request.path == LOGIN_PATH:
            return self._oauth.login_response(request)
        if request.path in DISCOVERY_PATHS:
            return Reply.json(200, metadata(self.issuer, self.authorize_url, self.token_url))
        if request.path in self._pages:
            return self._pages[request.path][1](request)
        if request.path == REFRESH_REPORT_PATH:
            report = [use.as_json() for use in self.refresh_token_report()]
            return Reply.json(200, {"refresh_tokens": report}, [("Cache-Control", "no-store")])
        return self._oauth.resource_response(request)

    def _record(self, request: Request) -> None:
        grant = {LOGIN_PATH: "login"}.get(request.path)
        if request.path == TOKEN_PATH:
            grant = "" if request.is_json else request.first_form.get("grant_type", "")
        record = request_record(request, grant)
        self._recorder.record(record, resource=request.path == RESOURCE_PATH)

    def __repr__(self) -> str:
        server = self._server
        where = server.url if server is not None else "stopped"
        return f"<AuthorizationServer {where} rotation={self._store.rotation!r}>"
