"""authlib's OAuth 2.0 server components, wired to the in-memory store. No I/O.

:class:`OAuth2Server` subclasses the framework-agnostic
``authlib.oauth2.AuthorizationServer`` and registers:

* ``ClientCredentialsGrant`` (RFC 6749 §4.4) and ``RefreshTokenGrant`` (RFC 6749 §6),
  subclassed to apply the store's rotation policy;
* the authorization-code grant with required PKCE ``S256``
  (:mod:`~tokenbroker.testing.authcode`);
* ``BearerTokenGenerator`` (RFC 6750) issuing ``secrets.token_urlsafe`` tokens;
* the client authentication methods of :mod:`~tokenbroker.testing.clientauth`;
* a ``ResourceProtector`` with a ``BearerTokenValidator`` for the protected resource.

It translates :class:`~tokenbroker.testing.messages.Request` into authlib's request
objects and authlib's ``(status, body, headers)`` triples into
:class:`~tokenbroker.testing.messages.Reply`.
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

from authlib.oauth2 import AuthorizationServer as _AuthlibServer
from authlib.oauth2.base import OAuth2Error
from authlib.oauth2.rfc6749 import (
    ClientCredentialsGrant,
    InvalidGrantError,
    JsonPayload,
    JsonRequest,
    OAuth2Payload,
    OAuth2Request,
    RefreshTokenGrant,
    ResourceProtector,
)
from authlib.oauth2.rfc6750 import BearerTokenGenerator, BearerTokenValidator, InvalidTokenError

from tokenbroker.testing.authcode import AuthorizationCodeGrant, CodeStore, S256CodeChallenge
from tokenbroker.testing.clientauth import (
    TOKEN_AUTH_METHODS,
    PrivateKeyJWT,
    authenticate_client_secret_basic,
)
from tokenbroker.testing.messages import Reply, Request

from .records import RefreshOutcome, TokenStore

__all__ = ["LoginRequiredError", "OAuth2Server", "ReuseError"]

log = logging.getLogger("tokenbroker.testing")

#: The error answered for a reused, revoked or unknown refresh token.
ReuseError = Literal["invalid_grant", "login_required"]


class LoginRequiredError(OAuth2Error):  # type: ignore[misc]
    """Tesla-style refusal of a dead refresh token: 401 ``login_required``."""

    error = "login_required"
    description = "The refresh token is no longer valid; the user must log in again."
    status_code = 401


class _OAuth2Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, fields: dict[str, list[str]]) -> None:
        self._datalist: defaultdict[str, list[str]] = defaultdict(list, fields)
        self._data = {name: values[0] for name, values in fields.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class _OAuth2Request(OAuth2Request):  # type: ignore[misc]
    def __init__(self, request: Request) -> None:
        super().__init__(request.method, request.url, headers=request.headers)
        # The authorization endpoint takes its parameters from the query (RFC 6749 §4.1.1).
        self.payload = _OAuth2Payload(request.query if request.method == "GET" else request.form)
        self._args = {name: values[0] for name, values in request.query.items()}

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        data: dict[str, str] = self.payload.data
        return data


class _JsonPayload(JsonPayload):  # type: ignore[misc]
    def __init__(self, request: Request) -> None:
        self._request = request

    @property
    def data(self) -> Any:
        return self._request.json()


class _JsonRequest(JsonRequest):  # type: ignore[misc]
    def __init__(self, request: Request) -> None:
        super().__init__(request.method, request.url, request.headers)
        self.payload = _JsonPayload(request)


class _ClientCredentialsGrant(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS


class _RefreshTokenGrant(RefreshTokenGrant):  # type: ignore[misc]
    """RFC 6749 §6 with the store's rotation policy.

    The token is spent atomically at the end of validation, after client authentication
    and the scope check, so concurrent presentations of one token cannot both pass.
    """

    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS

    @property
    def INCLUDE_NEW_REFRESH_TOKEN(self) -> bool:
        rotates: bool = self.server.store.rotates
        return rotates

    def authenticate_refresh_token(self, refresh_token: str) -> Any:
        record = self.server.store.find_refresh(refresh_token)
        if record is None:
            self.server.store.reject_unknown(refresh_token)
            raise self.server.refresh_error()
        return record

    def validate_token_request(self) -> None:
        super().validate_token_request()
        outcome = self.server.store.consume_refresh(self.request.refresh_token)
        if not outcome.ok:
            raise self.server.refresh_error()
        if outcome is RefreshOutcome.ACCEPTED_IN_GRACE:
            log.info("refresh token reused within the grace window; issuing a successor")

    def authenticate_user(self, refresh_token: Any) -> str:
        subject: str = refresh_token.client_id
        return subject

    def revoke_old_credential(self, refresh_token: Any) -> None:
        """Nothing to do: the token was spent in :meth:`validate_token_request`."""


class _BearerValidator(BearerTokenValidator):  # type: ignore[misc]
    def __init__(self, store: TokenStore) -> None:
        super().__init__()
        self._store = store

    def authenticate_token(self, token_string: str) -> Any:
        return self._store.find_bearer(token_string)


def _random_token(**_: Any) -> str:
    return secrets.token_urlsafe(32)


class OAuth2Server(_AuthlibServer):  # type: ignore[misc]
    """authlib's ``AuthorizationServer`` bound to a :class:`TokenStore`.

    Thread-safe: all state lives in the store; grants are created per request.
    """

    def __init__(
        self,
        store: TokenStore,
        *,
        token_url: Callable[[], str],
        expires_in: int | None,
        reuse_error: ReuseError,
        jwt_leeway_seconds: int,
        code_ttl_seconds: float = 60,
    ) -> None:
        """Wire the grants, token generator, client auth methods and resource protector.

        Args:
            store: Where clients and tokens live.
            token_url: Returns the token endpoint URL, the only accepted JWT ``aud``.
            expires_in: Access-token lifetime in seconds; ``None`` omits ``expires_in``
                and never expires.
            reuse_error: Error answered for a reused, revoked or unknown refresh token.
            jwt_leeway_seconds: Clock skew tolerated on assertion ``exp``/``iat``/``nbf``.
            code_ttl_seconds: How long an authorization code may be exchanged.
        """
        super().__init__()
        self.store = store
        self.codes = CodeStore(store, ttl_seconds=code_ttl_seconds)
        self.reuse_error = reuse_error
        self._expires_in = expires_in
        generator = BearerTokenGenerator(_random_token, _random_token, self._expires_for)
        self.register_token_generator("default", generator)
        self.register_client_auth_method("client_secret_basic", authenticate_client_secret_basic)
        self.register_client_auth_method(
            "private_key_jwt", PrivateKeyJWT(store, token_url, jwt_leeway_seconds)
        )
        self.register_grant(_ClientCredentialsGrant)
        self.register_grant(_RefreshTokenGrant)
        self.register_grant(AuthorizationCodeGrant, [S256CodeChallenge(required=True)])
        self._protector = ResourceProtector()
        self._protector.register_token_validator(_BearerValidator(store))

    def _expires_for(self, client: Any, grant_type: str) -> int | None:
        return self._expires_in

    def refresh_error(self) -> OAuth2Error:
        """Build the error for a refresh token that must not be honoured.

        Returns:
            ``invalid_grant`` (400) or, in Tesla mode, ``login_required`` (401).
        """
        if self.reuse_error == "login_required":
            return LoginRequiredError()
        return InvalidGrantError()

    def query_client(self, client_id: str) -> Any:
        """Look a client up for authlib.

        Args:
            client_id: The client identifier.

        Returns:
            The :class:`~tokenbroker.testing.records.Client`, or ``None``.
        """
        return self.store.get_client(client_id)

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        """Persist a token response authlib generated.

        Args:
            token: The token response dict.
            request: The ``OAuth2Request`` being served.
        """
        code = request.authorization_code
        family = code.family if code is not None else None
        self.store.save_issued(token, request.client.client_id, request.refresh_token, family)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Receive authlib's signals; only logged.

        Args:
            name: The signal name, e.g. ``"after_authenticate_client"``.
            *args: Signal arguments.
            **kwargs: Signal arguments.
        """
        client = kwargs.get("client")
        log.debug("signal %s client_id=%s", name, getattr(client, "client_id", None))

    def create_oauth2_request(self, request: Any) -> Any:
        """Adapt a request for authlib's grants.

        Args:
            request: A :class:`~tokenbroker.testing.messages.Request` (or an already
                adapted ``OAuth2Request``).

        Returns:
            An ``OAuth2Request`` whose payload is the form body.
        """
        if isinstance(request, OAuth2Request):
            return request
        return _OAuth2Request(request)

    def create_json_request(self, request: Any) -> Any:
        """Adapt a request with a JSON body for authlib.

        Args:
            request: A :class:`~tokenbroker.testing.messages.Request`.

        Returns:
            A ``JsonRequest`` whose payload data decodes the body lazily.
        """
        return _JsonRequest(request)

    def handle_response(self, status: int, body: Any, headers: Any) -> Reply:
        """Turn authlib's response triple into a reply.

        Args:
            status: The status code.
            body: A dict (JSON-encoded) or a string.
            headers: ``(name, value)`` pairs.

        Returns:
            The reply.
        """
        return Reply.json(status, body, headers or ())

    def token_response(self, request: Request) -> Reply:
        """Serve the token endpoint (RFC 6749 §3.2).

        Args:
            request: A ``POST`` to the token endpoint.

        Returns:
            The token response or an RFC 6749 §5.2 error.
        """
        reply: Reply = self.create_token_response(request)
        return reply

    def resource_response(self, request: Request) -> Reply:
        """Serve the protected resource (RFC 6750 §2.1, §3).

        Args:
            request: A request that should carry ``Authorization: Bearer <token>``.

        Returns:
            200 ``{"ok": true, "subject": ...}`` for a live access or login token,
            otherwise 401 with ``WWW-Authenticate: Bearer error="invalid_token"``.
        """
        oauth_request = self.create_oauth2_request(request)
        try:
            token = self._protector.validate_request(None, oauth_request)
        except OAuth2Error as error:
            if not isinstance(error, InvalidTokenError):
                error = InvalidTokenError()
            reply: Reply = self.handle_error_response(oauth_request, error)
            return reply
        return Reply.json(200, {"ok": True, "subject": token.subject})

    def login_response(self, request: Request) -> Reply:
        """Serve the DolphinDB-style login endpoint.

        Args:
            request: A ``POST`` with ``username`` and ``password`` as JSON or form fields.

        Returns:
            200 ``{"code": 0, "data": {"token": ...}, "result": [...]}`` (the token at
            ``data.token``, and at ``result.0`` as DolphinDB answers, which tpp and
            ``tokenbroker import tpp`` read), 401 ``{"code": 1, "message":
            "bad credentials"}``, or 400 for an undecodable JSON body.
        """
        no_store = [("Cache-Control", "no-store")]
        if request.is_json:
            try:
                fields = self.create_json_request(request).payload.data
            except ValueError:
                return Reply.json(400, {"code": 1, "message": "malformed request"}, no_store)
        else:
            fields = request.first_form
        username = fields.get("username") if isinstance(fields, dict) else None
        password = fields.get("password") if isinstance(fields, dict) else None
        if (
            isinstance(username, str)
            and isinstance(password, str)
            and self.store.check_account(username, password)
        ):
            token = self.store.issue_login(username)
            body = {"code": 0, "data": {"token": token}, "result": [token]}
            return Reply.json(200, body, no_store)
        return Reply.json(401, {"code": 1, "message": "bad credentials"}, no_store)
