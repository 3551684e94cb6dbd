"""The ``providers:`` models: one per grant (client credentials, refresh token, login), with
their ``defaults:``, delegation, rotation and accounts.

A provider's optional timing fields override :class:`Defaults`; ``Provider`` is the union
pydantic picks from by ``grant``. Secrets are :class:`~tokenbroker.core.secret.Secret`.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..core.scopes import MAX_SCOPE_LENGTH, SCOPE_TOKEN
from ..core.secret import Secret

__all__ = [
    "Authorization",
    "ClientAuth",
    "ClientCredentialsProvider",
    "Credential",
    "Defaults",
    "Delegation",
    "JwtDelegation",
    "LoginProvider",
    "LoginRequest",
    "Provider",
    "RefreshTokenProvider",
    "Rotation",
    "UpstreamDelegation",
]

#: How a client authenticates at the token endpoint (RFC 6749 §2.3, RFC 7523 §2.2).
ClientAuth = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]


class _Frozen(BaseModel):
    """Every config model: immutable once validated, and an unknown field is a problem."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Defaults(_Frozen):
    """Timing and retry settings every provider inherits unless it overrides them."""

    skew_seconds: float = Field(30.0, ge=0)
    refresh_ahead: float = Field(0.8, gt=0, le=1)
    timeout_seconds: float = Field(10.0, gt=0)
    deadline_seconds: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0, le=10)
    backoff_seconds: float = Field(0.5, ge=0)
    max_response_bytes: int = Field(1 << 20, ge=1024)
    lease_seconds: float | None = Field(None, gt=0)
    store_busy_timeout_seconds: float = Field(5.0, gt=0)
    refresh_concurrency: int = Field(8, ge=1, le=256)
    #: After an invalidation forces a new token, further ones for that key are refused this long.
    invalidate_cooldown_seconds: float = Field(5.0, ge=0, le=3600)
    #: Distinct scope sets (the configured one included) a provider serves.
    max_scopes: int = Field(16, ge=1, le=1024)

    @field_validator("lease_seconds")
    @classmethod
    def _lease(cls, value: float | None, info: ValidationInfo) -> float | None:
        deadline = info.data.get("deadline_seconds")
        if value is not None and deadline is not None:
            _check_lease(value, deadline, "deadline_seconds")
        return value


def _check_lease(lease: float, deadline: float, which: str) -> None:
    """A refresh holds its lease for up to two deadlines (the exchange, then its recovery)."""
    if lease < 2 * deadline + 2:
        raise ValueError(
            f"{which} {deadline:g} needs defaults.lease_seconds of at least "
            f"{2 * deadline + 2:g} (2 x deadline + 2); it is {lease:g}"
        )


def _check_url(value: str, *, https_only: bool) -> str:
    """``value`` if it is an absolute http(s) URL without credentials (and, with
    ``https_only``, https unless the host is loopback); else ValueError saying which."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials in the URL")
    if https_only and parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("must use https (plain http is allowed only for loopback hosts)")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JwtDelegation(_Frozen):
    """The broker mints short-lived, audience- and object-bound JWTs itself."""

    mode: Literal["jwt"]
    audiences: tuple[str, ...] = Field(min_length=1)
    max_lifetime_seconds: float = Field(300.0, gt=0, le=86400)
    issuer: str = "tokenbroker"
    algorithm: Literal["EdDSA", "ES256"] = "EdDSA"


class UpstreamDelegation(_Frozen):
    """The broker asks an upstream delegation endpoint, with its own service token.

    ``body`` is a JSON template: ``{audience}``, ``{object}``, ``{subject}``, ``{consumer}``
    (who asked) and ``{lifetime}`` are replaced (e.g. the seed's
    ``file-access/download-tokens``). A string that is one placeholder alone takes the
    value's JSON type (``"{lifetime}"`` is sent as the number ``300``; an absent object or
    subject as ``null``); inside a longer string a placeholder is replaced as text. Numbers,
    booleans and nulls of the template are sent as they are.

    Attributes:
        scope: The scope of the service token presented to the endpoint (e.g.
            ``files:download.delegate``), fetched with the provider's own client and cached
            apart from its ordinary tokens; None: the provider's configured scopes.
        expires_in_path: Where the reply says how many seconds the token lives (default
            ``expires_in``; absent from a reply: the lifetime asked for).
        expires_at_path: Where the reply says when the token expires, as an ISO-8601 time
            (a time without an offset is UTC) or Unix seconds.
    """

    mode: Literal["upstream"]
    url: str
    body: dict[str, Any] = Field(
        default_factory=lambda: {"object_key": "{object}", "expires_in": "{lifetime}"}
    )
    token_path: str = "token"
    expires_in_path: str | None = "expires_in"
    expires_at_path: str | None = None
    scope: str | None = None
    audiences: tuple[str, ...] = Field(min_length=1)
    max_lifetime_seconds: float = Field(300.0, gt=0, le=86400)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, https_only=True)

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str | None:
        if value is not None:
            tokens = value.split()
            if not tokens or not all(SCOPE_TOKEN.match(token) for token in tokens):
                raise ValueError("must be RFC 6749 scope-tokens separated by spaces")
            if len(value) > MAX_SCOPE_LENGTH:
                raise ValueError(f"must be at most {MAX_SCOPE_LENGTH} characters")
        return value


Delegation = Annotated[JwtDelegation | UpstreamDelegation, Field(discriminator="mode")]


class _ProviderBase(_Frozen):
    delegation: Delegation | None = None
    skew_seconds: float | None = Field(None, ge=0)
    refresh_ahead: float | None = Field(None, gt=0, le=1)
    timeout_seconds: float | None = Field(None, gt=0)
    deadline_seconds: float | None = Field(None, gt=0)
    retries: int | None = Field(None, ge=0, le=10)
    backoff_seconds: float | None = Field(None, ge=0)
    default_expires_in: float = Field(3600.0, gt=0)
    required: bool = False
    invalidate_cooldown_seconds: float | None = Field(None, ge=0, le=3600)

    @field_validator("deadline_seconds")
    @classmethod
    def _lease(cls, value: float | None, info: ValidationInfo) -> float | None:
        lease = (info.context or {}).get("lease_seconds")
        if value is not None and lease is not None:
            _check_lease(lease, value, "this deadline_seconds")
        return value


class _OAuthProvider(_ProviderBase):
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: Secret | None = None
    client_auth: ClientAuth = "client_secret_basic"
    private_key: Secret | None = None
    signing_alg: Literal["RS256", "ES256", "EdDSA", "PS256"] | None = None
    assertion_audience: str | None = None
    scopes: tuple[str, ...] = ()
    max_scopes: int | None = Field(None, ge=1, le=1024)
    audience: str | None = None

    @field_validator("token_url")
    @classmethod
    def _token_url(cls, value: str) -> str:
        return _check_url(value, https_only=True)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for scope in value:
            if not SCOPE_TOKEN.match(scope):
                raise ValueError("each scope must be a non-empty RFC 6749 scope-token")
        if sum(len(scope) + 1 for scope in value) > MAX_SCOPE_LENGTH:
            raise ValueError(f"the scopes must be at most {MAX_SCOPE_LENGTH} characters in all")
        return value

    @model_validator(mode="after")
    def _auth_material(self) -> _OAuthProvider:
        method = self.client_auth
        if method in ("client_secret_basic", "client_secret_post") and not self.client_secret:
            raise ValueError(f"client_auth {method} needs client_secret")
        if method == "none":
            # A confidential client configured as public would fail with invalid_client.
            unsent = [name for name in ("client_secret", "private_key") if getattr(self, name)]
            if unsent:
                raise ValueError(
                    f"client_auth none never sends {' or '.join(unsent)}: remove it, or set "
                    "client_auth to client_secret_basic, client_secret_post or private_key_jwt"
                )
        if method == "private_key_jwt" and not self.private_key:
            raise ValueError("client_auth private_key_jwt needs private_key (PEM)")
        if self.private_key:
            try:
                key = load_pem_private_key(self.private_key.reveal().encode(), None)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise ValueError(
                    "private_key is not an unencrypted PEM private key (RSA, EC or Ed25519)"
                ) from None
            algs = _signing_algs(key)
            if not algs:
                raise ValueError("private_key must be RSA (2048+ bits), EC P-256 or Ed25519")
            if self.signing_alg is not None and self.signing_alg not in algs:
                raise ValueError(f"signing_alg {self.signing_alg} does not fit private_key")
        return self


def _signing_algs(key: object) -> tuple[str, ...]:
    """The JWS algorithms private_key_jwt can sign with ``key`` (RFC 7518 §3)."""
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return ("RS256", "PS256")
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return ("ES256",)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return ("EdDSA",)
    return ()


class ClientCredentialsProvider(_OAuthProvider):
    """OAuth2 client credentials (RFC 6749 §4.4)."""

    grant: Literal["client_credentials"]


class Rotation(_Frozen):
    """How the provider rotates refresh tokens.

    Attributes:
        single_use: Each refresh token works once (a new one comes with each reply).
        reuse_grace_seconds: How long the provider still accepts a used one (Tesla: 86400).
        idle_expiry_days: The refresh token dies when unused this long (Tesla: 90); the
            ``keepalive`` job refreshes it before then. None: it does not expire when idle.
    """

    single_use: bool = True
    reuse_grace_seconds: float = Field(0.0, ge=0)
    idle_expiry_days: float | None = Field(None, gt=0)


#: Authorization request parameters the broker sets itself (RFC 6749 §4.1.1, RFC 7636 §4.3).
RESERVED_AUTHORIZATION_PARAMS = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    }
)


class Authorization(_Frozen):
    """How a person re-authorises a refresh-token credential: the authorization-code grant
    with PKCE ``S256`` (RFC 6749 §4.1, RFC 7636), driven by an ``authorize`` job.

    Attributes:
        authorize_url: The authorization endpoint; may come from discovery instead.
        redirect_uri: Exactly the redirection URI registered at the provider (the broker's
            ``/v1/oauth/callback``).
        scopes: The scopes asked for (``offline_access`` for a refresh token).
        params: Extra authorization request parameters (``prompt: consent``).
        issuer: The provider's issuer identifier: checked against ``iss`` (RFC 9207);
            ``{issuer}/.well-known/openid-configuration`` is the default discovery URL.
        discovery_url: The metadata document (RFC 8414 / OpenID Connect discovery).
        expires_in_seconds: How long a started authorisation (its ``state``) stays valid.
    """

    authorize_url: str | None = None
    redirect_uri: str
    scopes: tuple[str, ...] = ()
    params: dict[str, str] = Field(default_factory=dict)
    issuer: str | None = None
    discovery_url: str | None = None
    expires_in_seconds: float = Field(600.0, ge=1, le=86400)

    @field_validator("authorize_url", "redirect_uri", "discovery_url", "issuer")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _check_url(value, https_only=True)
        if urlsplit(value).fragment or "#" in value:
            raise ValueError("must not have a fragment")
        return value

    @field_validator("scopes")
    @classmethod
    def _scope_tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not all(SCOPE_TOKEN.match(scope) for scope in value):
            raise ValueError("each scope must be a non-empty RFC 6749 scope-token")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, str]) -> dict[str, str]:
        taken = sorted(RESERVED_AUTHORIZATION_PARAMS & set(value))
        if taken:
            raise ValueError(f"{taken[0]} is set by the broker; remove it from params")
        return value

    @model_validator(mode="after")
    def _endpoint(self) -> Authorization:
        if not (self.authorize_url or self.discovery_url or self.issuer):
            raise ValueError("needs authorize_url, or discovery_url or issuer to discover it")
        return self


class RefreshTokenProvider(_OAuthProvider):
    """A refresh-token credential (RFC 6749 §6), possibly single-use and rotating."""

    grant: Literal["refresh_token"]
    client_auth: ClientAuth = "none"
    refresh_token: Secret
    rotation: Rotation = Rotation()
    reauthorization_errors: tuple[str, ...] = ("invalid_grant", "login_required")
    authorization: Authorization | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_client_auth(cls, data: Any) -> Any:
        """Without ``client_auth``, authenticate with what is configured: a client_secret →
        ``client_secret_basic`` (RFC 6749 §2.3.1), else a private_key → ``private_key_jwt``,
        else ``none`` (a public client, RFC 6749 §2.1)."""
        if not isinstance(data, dict) or "client_auth" in data:
            return data
        if data.get("client_secret"):
            return {**data, "client_auth": "client_secret_basic"}
        if data.get("private_key"):
            return {**data, "client_auth": "private_key_jwt"}
        return data


class Credential(_Frozen):
    """One username/password account of a login provider.

    ``sessions: N`` logs the account in N times and pools each login as its own token, as
    tpp's ``token.pool_size`` did with its one credential; the pool's account names are then
    ``username``, ``username#2`` … ``username#N`` (:meth:`accounts`).
    """

    username: str = Field(min_length=1)
    password: Secret
    sessions: int = Field(1, ge=1, le=10_000)

    def accounts(self) -> tuple[str, ...]:
        """The pool account names of this credential, one per session."""
        return (self.username, *(f"{self.username}#{n}" for n in range(2, self.sessions + 1)))


class LoginRequest(_Frozen):
    """The login request body template; ``{username}`` and ``{password}`` are replaced."""

    json_body: dict[str, Any] | None = Field(None, alias="json")
    form: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> LoginRequest:
        if (self.json_body is None) == (self.form is None):
            raise ValueError("give exactly one of json or form")
        return self


class LoginProvider(_ProviderBase):
    """Username/password login returning a bearer token (e.g. DolphinDB ``/api/login``)."""

    grant: Literal["login"]
    login_url: str
    request: LoginRequest = LoginRequest(json={"username": "{username}", "password": "{password}"})
    token_path: str = "token"
    expires_in_path: str | None = None
    token_type: str = "Bearer"
    ttl_seconds: float = Field(3600.0, gt=0)
    credentials: tuple[Credential, ...] = ()

    @field_validator("login_url")
    @classmethod
    def _login_url(cls, value: str) -> str:
        return _check_url(value, https_only=False)

    @model_validator(mode="after")
    def _has_accounts(self) -> LoginProvider:
        if not self.credentials:
            raise ValueError("needs at least one account in credentials or credentials_file")
        names = [name for c in self.credentials for name in c.accounts()]
        if len(set(names)) != len(names):
            raise ValueError("an account is listed twice (sessions name them username#N)")
        return self


Provider = Annotated[
    ClientCredentialsProvider | RefreshTokenProvider | LoginProvider,
    Field(discriminator="grant"),
]
