"""Configuration: YAML with ``${VAR}`` interpolation and ``.env``, validated into frozen models.

This is the only module that reads environment variables and files. Loading is
loose at the edge (YAML, strings, env) and strict inside: the result is a
frozen :class:`Settings` whose secrets are :class:`~tokenbroker.core.secret.Secret`.
Every problem is collected with its dotted field path; a missing environment
variable is named; no message ever contains a value from the file.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from dotenv import dotenv_values
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..core.crypto import decode_key
from ..core.names import CONSUMER_NAME_PATTERN, PROVIDER_NAME_PATTERN
from ..core.rules import DELEGATE, DELEGATE_AS, check_subject, parse_rule
from ..core.scopes import MAX_SCOPE_LENGTH, SCOPE_TOKEN, scope_string
from ..core.secret import Secret
from ..errors import ConfigError, ConfigProblem, InvalidDelegationError, InvalidScopeError
from ..store import backend_for, is_persistent

__all__ = [
    "ClientCredentialsProvider",
    "ConsumerSettings",
    "Credential",
    "Defaults",
    "Delegation",
    "JwtDelegation",
    "LoginProvider",
    "LoginRequest",
    "Provider",
    "ProxyRoute",
    "ProxySettings",
    "Redirect",
    "RefreshTokenProvider",
    "Rotation",
    "ServerSettings",
    "Settings",
    "TelemetrySettings",
    "UpstreamDelegation",
    "config_warnings",
    "default_config_path",
    "load_settings",
    "parse_settings",
    "startup_problems",
]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ProviderName = Annotated[str, StringConstraints(pattern=f"^{PROVIDER_NAME_PATTERN}$")]
_MAX_DEPTH = 50
_MAX_NODES = 100_000
ClientAuth = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]


class _Frozen(BaseModel):
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
    ``file-access/download-tokens``).
    """

    mode: Literal["upstream"]
    url: str
    body: dict[str, Any] = Field(
        default_factory=lambda: {"object_key": "{object}", "expires_in": "{lifetime}"}
    )
    token_path: str = "token"
    expires_in_path: str | None = None
    audiences: tuple[str, ...] = Field(min_length=1)
    max_lifetime_seconds: float = Field(300.0, gt=0, le=86400)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, https_only=True)


Delegation = Annotated[JwtDelegation | UpstreamDelegation, Field(discriminator="mode")]


class Redirect(_Frozen):
    """A redirect route: ``GET /v1/redirects/{name}/{path}`` → 302 to ``url/path?param=token``."""

    provider: str
    audience: str
    url: str
    param: str = Field("token", pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, https_only=True)


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


def _check_url(value: str, *, https_only: bool) -> str:
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
    """

    single_use: bool = True
    reuse_grace_seconds: float = Field(0.0, ge=0)


class RefreshTokenProvider(_OAuthProvider):
    """A refresh-token credential (RFC 6749 §6), possibly single-use and rotating."""

    grant: Literal["refresh_token"]
    client_auth: ClientAuth = "none"
    refresh_token: Secret
    rotation: Rotation = Rotation()
    reauthorization_errors: tuple[str, ...] = ("invalid_grant", "login_required")

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
    """One username/password account of a login provider."""

    username: str = Field(min_length=1)
    password: Secret


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
        names = [c.username for c in self.credentials]
        if len(set(names)) != len(names):
            raise ValueError("an account is listed twice")
        return self


Provider = Annotated[
    ClientCredentialsProvider | RefreshTokenProvider | LoginProvider,
    Field(discriminator="grant"),
]


def _key(value: Secret) -> Secret:
    decode_key(value.reveal())  # ValueError: KEY_FORMAT, never the key
    return value


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT (port 0 picks a free one)")
    return value


class ProxyRoute(_Frozen):
    """One path prefix of the reverse proxy, sent to one upstream with one provider's tokens.

    ``mode: pool`` leases one account of a login provider to each client
    connection; ``mode: shared`` gives every request the provider's current token.
    A pool connection with no request for ``idle_timeout_seconds`` gives its account
    back and is closed; a connection waiting ``wait_timeout_seconds`` for an account
    gets 503 ``pool_exhausted`` + ``Retry-After`` (both bounded by default: an idle
    client must not hold an account, nor a waiter wait, forever).
    Only the route's ``methods`` are forwarded (others get 405 with ``Allow``);
    TRACE and CONNECT never are.
    """

    prefix: str = Field(pattern=r"^/[^?#%\\\x00]*$")
    upstream: str
    provider: str
    mode: Literal["pool", "shared"] = "pool"
    scope: str | None = None
    wait_timeout_seconds: float = Field(60.0, gt=0)
    idle_timeout_seconds: float = Field(30.0, gt=0)
    max_lease_seconds: float | None = Field(None, gt=0)
    methods: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Methods are case-sensitive (RFC 9110 §9.1): "get" is not GET, so it is refused
        # rather than silently never matching.
        if not value:
            raise ValueError("must list at least one method")
        for method in value:
            if not re.fullmatch(r"[A-Z][A-Z-]{0,19}", method):
                raise ValueError(f"{method!r} is not an upper-case HTTP method name")
            if method in ("TRACE", "CONNECT"):
                raise ValueError(f"{method} is never forwarded: TRACE and CONNECT are refused")
        if len(set(value)) != len(value):
            raise ValueError("lists a method twice")
        return value

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str | None:
        try:
            return scope_string(value)
        except InvalidScopeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        parts = urlsplit(_check_url(value, https_only=False))
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value


class ProxySettings(_Frozen):
    """The token-injecting reverse proxy (``tokenbroker proxy``, DESIGN §3.1 ``proxy:``)."""

    listen: str = "127.0.0.1:8080"
    health_listen: str | None = None
    routes: tuple[ProxyRoute, ...] = Field(min_length=1)
    consumer_header: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    upstream_timeout_seconds: float = Field(30.0, gt=0)
    upstream_keepalive: int = Field(64, ge=0, le=10_000)
    upstream_idle_seconds: float = Field(4.0, gt=0)
    replay_body_bytes: int = Field(65_536, ge=0, le=16 << 20)
    login_concurrency: int = Field(8, ge=1, le=256)
    refresh_check_seconds: float = Field(1.0, gt=0)
    retry_after_seconds: float = Field(1.0, gt=0)
    client_body_timeout_seconds: float = Field(60.0, gt=0)
    client_header_timeout_seconds: float = Field(10.0, gt=0)
    # The whole request, head and body, however it trickles (body timeout measures silence).
    client_request_timeout_seconds: float = Field(120.0, gt=0)
    # No response byte taken by the client for this long closes it (nginx's send_timeout).
    client_send_timeout_seconds: float = Field(60.0, gt=0)
    #: An idle client connection (nothing in flight, no request begun) closes after this.
    client_keepalive_seconds: float = Field(15.0, gt=0)
    #: Client connections held at once; more get 503 and a close. Default: from the
    #: process's descriptor limit (:mod:`tokenbroker.edge.descriptors`).
    max_client_connections: int | None = Field(None, ge=1)

    @field_validator("listen", "health_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        return None if value is None else _check_listen(value)

    @model_validator(mode="after")
    def _unique(self) -> ProxySettings:
        prefixes = [r.prefix for r in self.routes]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("two routes have the same prefix")
        return self


_RATE = re.compile(
    r"\s*0*[1-9][0-9]*\s*(?:/|per)\s*(?:[0-9]+\s*)?(?:second|minute|hour|day|month|year)s?\s*",
    re.IGNORECASE,
)


def _origin(value: str) -> str:
    """A CORS origin is compared as a whole string: ``https://app.example/`` never matches."""
    parts = urlsplit(value)
    bare = parts.scheme in ("http", "https") and value == f"{parts.scheme}://{parts.netloc}"
    if value != "*" and not (bare and parts.hostname):
        raise ValueError("must be '*' or an origin: scheme://host[:port], no path or slash")
    return value


class _Section(_Frozen):
    """A section that used to be a plain mapping: ``section.get(name)`` still reads a field."""

    def get(self, name: str, default: Any = None) -> Any:
        """The field ``name``, or ``default`` when there is no such field (as ``dict.get``)."""
        return getattr(self, name, default) if name in type(self).model_fields else default


class ServerSettings(_Section):
    """The HTTP API (``tokenbroker serve``)."""

    listen: str = "127.0.0.1:8750"
    rate_limit: str | None = None
    cors_origins: tuple[Annotated[str, AfterValidator(_origin)], ...] = ()
    #: Peers whose X-Forwarded-For is believed (addresses or CIDR networks); none by default.
    trusted_proxies: tuple[str, ...] = ()
    #: Serve the OpenAPI document at /openapi.json (to consumers with a key only); off by default.
    openapi: bool = False
    #: Connections the API serves at once (uvicorn's ``limit_concurrency``; more get 503).
    #: Default: from the process's descriptor limit (:mod:`tokenbroker.edge.descriptors`).
    max_connections: int | None = Field(None, ge=1)
    #: Seconds a request body may stay silent before 408 (the proxy's name for it).
    client_body_timeout_seconds: float = Field(10.0, gt=0, le=86_400, allow_inf_nan=False)
    #: Seconds a whole request, head and body, may take to arrive before 408.
    client_request_timeout_seconds: float = Field(120.0, gt=0, le=86_400, allow_inf_nan=False)

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for position, proxy in enumerate(value):
            try:
                ipaddress.ip_network(proxy)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies.{position} is not an IP address or network (CIDR)"
                ) from None
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _check_listen(value)

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is not None and not _RATE.fullmatch(value):
            raise ValueError("must be one rate such as 50/second or 1000 per 10 minutes")
        return value


class TelemetrySettings(_Section):
    """Logs (and, later, OpenTelemetry export)."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    otlp_endpoint: str | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


def _allow_rule(value: str, info: ValidationInfo) -> str:
    rule = parse_rule(value)  # ValueError names the format
    known = (info.context or {}).get("providers")
    if known is not None and rule.provider not in known:
        raise ValueError(f"no provider named {rule.provider!r}")
    return value


def _subject(value: str) -> str:
    try:
        return check_subject(value)
    except InvalidDelegationError as exc:
        raise ValueError(str(exc)) from None


class ConsumerSettings(_Section):
    """A consumer defined in the config: its key's SHA-256, what it may ask for, and the
    subject of the delegated tokens it gets (default: its name)."""

    api_key_sha256: str
    allow: tuple[Annotated[str, AfterValidator(_allow_rule)], ...] = ()
    subject: Annotated[str, AfterValidator(_subject)] | None = None

    @field_validator("api_key_sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hex digits (the SHA-256 of the key, not the key)")
        return value.lower()


_ConsumerName = Annotated[str, StringConstraints(pattern=f"^{CONSUMER_NAME_PATTERN}$")]


class Settings(_Frozen):
    """The whole validated configuration (DESIGN §3.1)."""

    store: str = "sqlite:///./tokenbroker.db"
    redis: Secret | None = None
    encryption_keys: tuple[Annotated[Secret, AfterValidator(_key)], ...] = ()
    defaults: Defaults = Defaults()
    providers: dict[_ProviderName, Provider] = Field(default_factory=dict)
    consumers: dict[_ConsumerName, ConsumerSettings] = Field(default_factory=dict)
    server: ServerSettings = ServerSettings()
    proxy: ProxySettings | None = None
    telemetry: TelemetrySettings = TelemetrySettings()
    redirects: dict[str, Redirect] = Field(default_factory=dict)

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        backend_for(value)  # ValueError naming every form the registered backends accept
        return value

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, value: dict[str, Provider]) -> dict[str, Provider]:
        for name in (DELEGATE, DELEGATE_AS):
            if name in value:
                raise ValueError(f"{name!r} is a word of allow rules, not a provider name")
        return value

    @model_validator(mode="after")
    def _proxy_providers(self) -> Settings:
        for i, route in enumerate(self.proxy.routes if self.proxy else ()):
            provider = self.providers.get(route.provider)
            where = f"proxy.routes.{i}.provider"
            if provider is None:
                raise ValueError(f"{where}: no provider named {route.provider!r}")
            if (route.mode == "pool") != isinstance(provider, LoginProvider):
                raise ValueError(
                    f"{where}: mode pool needs a login provider and mode shared "
                    "a client_credentials or refresh_token provider"
                )
        return self


MISSING_KEY = (
    "is required for a file store (generate a key with `tokenbroker keygen`), or set store: memory"
)


def startup_problems(settings: Settings) -> list[ConfigProblem]:
    """Problems that stop a broker from starting although the file itself is valid.

    Args:
        settings: Validated settings.

    Returns:
        The problems (empty when the broker can start).
    """
    if is_persistent(settings.store) and not settings.encryption_keys:
        return [ConfigProblem("encryption_keys", MISSING_KEY)]
    return []


def default_config_path() -> Path:
    """The config file to use when none is given: ``$TOKENBROKER_CONFIG`` or ``tokenbroker.yaml``.

    Returns:
        The path (not checked for existence).
    """
    return Path(os.environ.get("TOKENBROKER_CONFIG") or "tokenbroker.yaml")


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read, interpolate and validate a config file.

    ``${VAR}`` and ``${VAR:-default}`` are taken from the process environment,
    then from a ``.env`` file beside the config file (the environment wins).

    Args:
        path: The YAML file; default :func:`default_config_path`.

    Returns:
        The frozen settings.

    Raises:
        ConfigError: Listing every problem, each with its field path.
    """
    file = Path(path) if path is not None else default_config_path()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read {file}: {exc.strerror}")]) from exc
    except ValueError as exc:  # UnicodeDecodeError, or a NUL byte in the path
        raise ConfigError(
            [ConfigProblem("", f"cannot read {file}: invalid path or not UTF-8 text")]
        ) from exc
    env: dict[str, str] = {}
    dotenv = file.parent / ".env"
    if dotenv.is_file():
        env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    env.update(os.environ)
    return parse_settings(text, env, base_dir=file.parent)


def parse_settings(text: str, env: Mapping[str, str], *, base_dir: Path = Path()) -> Settings:
    """Validate config text against an explicit environment (no process state is read).

    Args:
        text: The YAML document.
        env: Variables for ``${VAR}`` interpolation.
        base_dir: Where relative ``credentials_file`` paths are resolved.

    Returns:
        The frozen settings.

    Raises:
        ConfigError: Listing every problem, each with its field path.
    """
    loader = None
    try:
        loader = _Loader(text)
        raw = loader.get_single_data()
    except (yaml.YAMLError, RecursionError) as exc:
        # The parser's reason names at most one character of the text, never a value.
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None)
        mark = getattr(exc, "problem_mark", None)
        reason = f": {problem}" if problem else ""
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([ConfigProblem("", f"not valid YAML{reason}{where}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem("", "the document must be a mapping")])
    too_big = _too_big(raw)
    if too_big:
        raise ConfigError([ConfigProblem("", f"the document {too_big}")])
    problems: list[ConfigProblem] = []
    data = _interpolate(raw, env, (), problems)
    _read_credential_files(data, base_dir, problems)
    _resolve_store(data, base_dir)
    try:
        settings = Settings.model_validate(data, context=_context(data))
    except ValidationError as exc:
        blocked = {p.path for p in problems}
        for error in exc.errors(include_input=False, include_url=False):
            path = _path(error["loc"])
            if not any(_related(path, b) for b in blocked):
                problems.append(ConfigProblem(path, _message(error)))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return settings


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_document(self, node: yaml.Node) -> Any:
        # Checked on the composed nodes, before merge keys (``<<``) are flattened into them.
        stack, seen = [node], set()
        while stack:
            item = stack.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, yaml.MappingNode):
                keys: set[tuple[str, str]] = set()
                for key, value in item.value:
                    if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                        if (key.tag, key.value) in keys:
                            raise yaml.constructor.ConstructorError(
                                problem=f"the key {key.value!r} is given twice",
                                problem_mark=key.start_mark,
                            )
                        keys.add((key.tag, key.value))
                    stack.extend((key, value))
            elif isinstance(item, yaml.SequenceNode):
                stack.extend(item.value)
        return super().construct_document(node)


def _context(data: dict[str, Any]) -> dict[str, Any]:
    """What cross-field checks need: provider names, and the lease a provider's deadline needs."""
    providers = data.get("providers")
    try:
        lease = Defaults.model_validate(data.get("defaults", {})).lease_seconds
    except ValidationError:  # reported where Settings validates defaults
        lease = None
    return {
        "providers": set(providers) if isinstance(providers, dict) else None,
        "lease_seconds": lease,
    }


def config_warnings(
    settings: Settings, path: str | os.PathLike[str] | None = None
) -> list[ConfigProblem]:
    """Settings that are valid but unwise or that nothing reads yet (``tokenbroker check``
    prints them; ``serve`` logs them).

    Args:
        settings: Validated settings.
        path: The file they were read from: a secret written in it (not ``${VAR}``), or a
            ``credentials_file``, that group or others may read is a warning too.

    Returns:
        One problem per such setting; the setting's value is never quoted.
    """
    warnings = [] if path is None else _readable_secrets(Path(path))
    if settings.redis is not None:
        warnings.append(
            ConfigProblem(
                "redis", "is not used yet: coalescing, events and rate limits stay per process"
            )
        )
    if settings.telemetry.otlp_endpoint is not None:
        warnings.append(
            ConfigProblem("telemetry.otlp_endpoint", "is not used yet: nothing is exported")
        )
    return warnings


#: Fields whose value is a secret, wherever they appear (``password`` in ``credentials``, a
#: login request template ...); ``redis`` only for the password in its URL.
_SECRET_FIELDS = frozenset(
    {"client_secret", "private_key", "refresh_token", "password", "encryption_keys", "redis"}
)


def _readable_secrets(file: Path) -> list[ConfigProblem]:
    """A warning for ``file`` if it holds a secret literally and group or others may read it,
    and for each ``credentials_file`` it names that they may read."""
    if os.name == "nt":  # no POSIX modes to check
        return []
    loader = None
    try:
        loader = _Loader(file.read_text(encoding="utf-8"))
        raw = loader.get_single_data()
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return []  # load_settings has read it once; a race is not worth a second report
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(raw, dict):
        return []
    warnings = []
    literal = _literal_secrets(raw, ())
    if literal:
        more = f" (and {len(literal) - 1} more secret field(s))" if len(literal) > 1 else ""
        readable = _group_or_world(file, f"is a secret written in {file}{more}")
        warnings += [ConfigProblem(literal[0], readable)] if readable else []
    providers = raw.get("providers")
    for name, provider in providers.items() if isinstance(providers, dict) else ():
        listed = provider.get("credentials_file") if isinstance(provider, dict) else None
        if isinstance(listed, str) and not _ENV_REF.search(listed):
            accounts = Path(listed) if Path(listed).is_absolute() else file.parent / listed
            readable = _group_or_world(accounts, f"{accounts} holds passwords")
            where = f"providers.{name}.credentials_file"
            warnings += [ConfigProblem(where, readable)] if readable else []
    return warnings


def _group_or_world(file: Path, what: str) -> str | None:
    """The warning for ``file`` (``what`` it holds) if group or others may read or write it."""
    try:
        mode = file.stat().st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"{what}, which group or others may read (mode {mode:04o}): "
        f"run `chmod 600 {file}`, or set the secret from an environment variable (${{VAR}})"
    )


def _literal_secrets(node: Any, path: tuple[str, ...]) -> list[str]:
    """The dotted paths of secret fields under ``node`` whose value is written out, not
    taken whole from ``${VAR}`` (a ``${VAR:-default}`` default is written out too)."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        where = (*path, str(key))
        if isinstance(key, str) and key in _SECRET_FIELDS:
            values = value if isinstance(value, list) else [value]
            if key == "redis":
                values = [urlsplit(v).password if isinstance(v, str) else None for v in values]
            if any(_written_out(v) for v in values):
                found.append(".".join(where))
        elif isinstance(value, (dict, list)) and key != "request":
            # (a login request template's "{password}" is a placeholder, not a secret)
            found += _literal_secrets(value, where)
    return found


def _written_out(value: object) -> bool:
    if value is None or value == "":
        return False
    if not isinstance(value, str):
        return True  # a number or a mapping is written in the file too
    if any(match.group(2) for match in _ENV_REF.finditer(value)):
        return True
    return bool(_ENV_REF.sub("", value).strip())


def _too_big(node: Any) -> str | None:
    """Why ``node`` is unsafe to walk (deep nesting, alias loops, alias bombs), or None."""
    stack, count = [(node, 0)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > _MAX_DEPTH:
            return "nests too deeply (or a YAML alias refers to itself)"
        if count > _MAX_NODES:
            return "is too large once YAML aliases are expanded"
        if isinstance(item, dict):
            stack.extend((value, depth + 1) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in item)
    return None


def _related(path: str, blocked: str) -> bool:
    """A missing variable explains errors at its field, below it and at the models above it."""
    return path == blocked or path.startswith(blocked + ".") or blocked.startswith(path + ".")


def _interpolate(
    node: Any, env: Mapping[str, str], path: tuple[str, ...], problems: list[ConfigProblem]
) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, env, (*path, str(k)), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, (*path, str(i)), problems) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is not None:
                return default
            problems.append(
                ConfigProblem(
                    ".".join(path), f"environment variable {name} is not set", env_var=name
                )
            )
            return ""
        return value

    return _ENV_REF.sub(substitute, node)


def _resolve_store(data: dict[str, Any], base: Path) -> None:
    """A relative ``sqlite:///path`` is relative to the config file, like ``credentials_file``."""
    store = data.get("store", Settings.model_fields["store"].default)
    if isinstance(store, str) and store.startswith("sqlite:///"):
        path = Path(store.removeprefix("sqlite:///"))
        if not path.is_absolute() and str(path) != ":memory:":
            data["store"] = f"sqlite:///{base / path}"


def _read_credential_files(data: dict[str, Any], base: Path, problems: list[ConfigProblem]) -> None:
    providers = data.get("providers")
    if not isinstance(providers, dict):
        return
    for name, provider in providers.items():
        if not isinstance(provider, dict) or "credentials_file" not in provider:
            continue
        where = f"providers.{name}.credentials_file"
        file = Path(str(provider.pop("credentials_file")))
        file = file if file.is_absolute() else base / file
        inline = provider.get("credentials")
        if inline is not None and not isinstance(inline, list):
            continue  # pydantic reports the wrong type at providers.<name>.credentials
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            problems.append(ConfigProblem(where, f"cannot read {file}: {exc.strerror}"))
            continue
        except ValueError:  # UnicodeDecodeError, or a NUL byte in the path
            problems.append(
                ConfigProblem(where, f"cannot read {file}: invalid path or not UTF-8 text")
            )
            continue
        accounts = list(inline or [])
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            username, sep, password = line.strip().partition(":")
            if not sep or not username or not password:
                problems.append(ConfigProblem(where, f"line {number} is not username:password"))
                continue
            accounts.append({"username": username, "password": password})
        provider["credentials"] = accounts


def _path(loc: tuple[int | str, ...]) -> str:
    # Drop pydantic's discriminator tags ("client_credentials") and model names from the path.
    parts = [str(p) for p in loc]
    if (
        len(parts) >= 3
        and parts[0] == "providers"
        and parts[2]
        in (
            "client_credentials",
            "refresh_token",
            "login",
        )
    ):
        del parts[2]
    return ".".join(p for p in parts if not p.startswith("function-") and p != "[key]")


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        near = difflib.get_close_matches(str(error["loc"][-1]), _fields_at(error["loc"][:-1]), 1)
        return "is not a known field" + (f" (did you mean {near[0]!r}?)" if near else "")
    if kind == "tuple_type":
        return "must be a list"
    if kind == "union_tag_invalid":
        return "grant must be one of client_credentials, refresh_token, login"
    if kind == "union_tag_not_found":
        return "grant is required (client_credentials, refresh_token or login)"
    if error["loc"][:1] == ("providers",) and error["loc"][-1:] == ("[key]",):
        return "is not a valid provider name (1-64 of a-z, 0-9, '_' and '-')"
    if error["loc"][:1] == ("consumers",) and error["loc"][-1:] == ("[key]",):
        return "is not a valid consumer name (1-64 of letters, digits, '_', '.' and '-')"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the model at ``loc`` in :class:`Settings` (for "did you mean")."""
    node: Any = Settings
    for part in loc:
        node = _step(node, part)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return [f.alias or name for name, f in node.model_fields.items()]
    return []


def _step(node: Any, part: int | str) -> Any:
    """The type one step below ``node`` along a pydantic error location."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        field = node.model_fields.get(str(part))
        return None if field is None else _unwrap(field.annotation, None)
    origin, args = typing.get_origin(node), typing.get_args(node)
    if origin is dict and len(args) == 2:
        return _unwrap(args[1], None)
    if origin is tuple and args:
        return _unwrap(args[0], None)
    if origin in (typing.Union, types.UnionType):
        return _unwrap(node, part)
    return None


def _unwrap(node: Any, tag: int | str | None) -> Any:
    """``node`` without Annotated and None; a union member by its pydantic tag (or if alone)."""
    while typing.get_origin(node) is Annotated:
        node = typing.get_args(node)[0]
    if typing.get_origin(node) not in (typing.Union, types.UnionType):
        return node
    members = [_unwrap(a, None) for a in typing.get_args(node) if a is not type(None)]
    if len(members) == 1:
        return members[0]
    for member in members:
        if isinstance(member, type) and issubclass(member, BaseModel):
            for name in ("grant", "mode"):
                field = member.model_fields.get(name)
                if field is not None and tag in typing.get_args(field.annotation):
                    return member
    return node
