"""The top-level sections (``server:``, ``proxy:``, ``telemetry:``, ``consumers:``,
``redirects:``) and :class:`Settings`, the whole frozen configuration (DESIGN §3.1).

Cross-field checks that need the whole document (an allow rule naming a provider, a proxy
route's provider and mode) read the validation context :mod:`.loading` passes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..core.crypto import decode_key
from ..core.names import CONSUMER_NAME_PATTERN, PROVIDER_NAME_PATTERN
from ..core.rules import ADMIN, DELEGATE, DELEGATE_AS, JOBS, check_subject, parse_rule
from ..core.scopes import scope_string
from ..core.secret import Secret
from ..errors import InvalidDelegationError, InvalidScopeError
from ..store import backend_for
from .logfilter import parse_log_filter
from .providers import Defaults, LoginProvider, Provider, _check_url, _Frozen

__all__ = [
    "CompatGetToken",
    "CompatSettings",
    "ConsumerSettings",
    "JobSchedule",
    "JobsSettings",
    "ProxyRoute",
    "ProxySettings",
    "Redirect",
    "ServerSettings",
    "Settings",
    "TelemetrySettings",
]

_ProviderName = Annotated[str, StringConstraints(pattern=f"^{PROVIDER_NAME_PATTERN}$")]
_ConsumerName = Annotated[str, StringConstraints(pattern=f"^{CONSUMER_NAME_PATTERN}$")]


def _key(value: Secret) -> Secret:
    decode_key(value.reveal())  # ValueError: KEY_FORMAT, never the key
    return value


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT (port 0 picks a free one)")
    return value


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
    #: ``tpp``: /metrics also exports tpp's ``tpp_*`` pool gauges beside ``tokenbroker_*``.
    metrics_compat: Literal["tpp"] | None = None

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


class JobSchedule(_Frozen):
    """One scheduled job: ``kind`` with ``params`` every ``every_seconds`` and/or at start-up.

    With several processes on one store, each period runs once: the store decides who starts
    it (:meth:`~tokenbroker.store.base.JobStore.claim_schedule`).
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    params: dict[str, Any] = Field(default_factory=dict)
    every_seconds: float | None = Field(None, ge=60)
    at_startup: bool = False

    @model_validator(mode="after")
    def _when(self) -> JobSchedule:
        if self.every_seconds is None and not self.at_startup:
            raise ValueError("needs every_seconds, at_startup: true, or both")
        return self


class JobsSettings(_Section):
    """Background jobs (issue 16): leases, limits, retries, retention and schedules."""

    heartbeat_seconds: float = Field(5.0, gt=0)
    lease_seconds: float = Field(30.0, gt=0)
    result_ttl_seconds: float = Field(86_400.0, ge=0)
    #: Jobs one instance runs at once; more wait queued (up to ``max_queued``).
    max_running: int = Field(4, ge=1, le=256)
    #: Queued jobs (not yet claimed by any instance on the store) beyond which starting
    #: another is refused with 429 ``too_many_jobs`` and Retry-After: one instance holds at
    #: most ``max_running + max_queued`` active jobs. 0: never queue (start only what can
    #: run at once).
    max_queued: int = Field(16, ge=0, le=10_000)
    #: Active (queued or running) jobs one consumer may have.
    max_running_per_consumer: int = Field(4, ge=1, le=256)
    #: How often an idle instance looks for queued and expired jobs.
    poll_seconds: float = Field(1.0, gt=0)
    #: Base of an item's retry backoff (full jitter, exponential, at most 3 attempts).
    retry_backoff_seconds: float = Field(0.5, ge=0)
    #: ``keepalive`` refreshes a token unused for longer than this share of its idle expiry.
    keepalive_fraction: float = Field(0.5, gt=0, le=1)
    #: The longest a job's canonical params may be, in bytes.
    max_params_bytes: int = Field(4096, ge=64)
    schedule: tuple[JobSchedule, ...] = ()

    @model_validator(mode="after")
    def _lease(self) -> JobsSettings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError("lease_seconds must be at least twice heartbeat_seconds")
        names = [s.name for s in self.schedule]
        if len(set(names)) != len(names):
            raise ValueError("schedule names must be unique")
        return self


class TelemetrySettings(_Section):
    """Logs, and OpenTelemetry traces exported over OTLP (the ``otel`` extra).

    ``log_filter`` (tpp's, ``RUST_LOG`` style: ``info,tokenbroker.proxy=debug``) sets levels
    per logger beside ``log_level``; its bare level, if it has one, replaces ``log_level``
    (:mod:`.logfilter`).

    Tracing is on when ``otlp_endpoint`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
    ``OTEL_EXPORTER_OTLP_ENDPOINT``) is set. A field left out (None) takes its standard
    ``OTEL_*`` variable, else its default: ``otlp_protocol`` grpc (port 4317; http/protobuf:
    4318, path ``/v1/traces``), ``service_name`` tokenbroker, ``sample_ratio`` 1.0.
    """

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    log_filter: str | None = None
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["grpc", "http/protobuf"] | None = None
    service_name: str | None = Field(None, min_length=1)
    sample_ratio: float | None = Field(None, ge=0.0, le=1.0)
    headers: dict[str, Secret] = {}

    def endpoint(self, environ: Mapping[str, str]) -> str | None:
        """Where traces go: ``otlp_endpoint``, else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
        ``OTEL_EXPORTER_OTLP_ENDPOINT`` from ``environ``; None (tracing off) without one,
        or with ``OTEL_SDK_DISABLED=true``."""
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        return (
            self.otlp_endpoint
            or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or None
        )

    @field_validator("log_filter")
    @classmethod
    def _filter(cls, value: str | None) -> str | None:
        if value is not None:
            parse_log_filter(value)  # ValueError names the bad part
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


# -- compat: routes shaped like the services the broker replaces (issue 19 §5) ------------


class CompatGetToken(_Frozen):
    """The Tesla token owner's ``GET /get-token``: ``{status: "success", access_token,
    token_source, remaining_minutes}`` or ``{status: "error", error}``.

    It needs a consumer key like every route; a caller whose TCP peer is in
    ``trusted_networks`` (addresses or CIDR networks, none by default) may call it without
    one (``check`` warns when this is set).
    """

    provider: _ProviderName
    path: str = Field("/get-token", pattern=r"^/[A-Za-z0-9._~/-]{1,200}$")
    scope: str | None = None
    trusted_networks: tuple[str, ...] = ()

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        # Never shadow the API's own routes or probes: the compat route is an addition.
        reserved = ("/v1/", "/livez", "/readyz", "/health", "/metrics", "/.well-known/")
        if value.startswith(reserved) or value in ("/v1", "/openapi.json"):
            raise ValueError("must not be under /v1/ or a probe's path")
        return value

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str | None:
        try:
            return scope_string(value)
        except InvalidScopeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for position, network in enumerate(value):
            try:
                ipaddress.ip_network(network)
            except ValueError:
                raise ValueError(
                    f"trusted_networks.{position} is not an IP address or network (CIDR)"
                ) from None
        return value


class CompatSettings(_Section):
    """Compatibility routes for users of the original systems; each is off until set."""

    get_token: CompatGetToken | None = None


def _allow_rule(value: str, info: ValidationInfo) -> str:
    rule = parse_rule(value)  # ValueError names the format
    known = (info.context or {}).get("providers")
    if known is not None and rule.action not in ("jobs", "admin") and rule.provider not in known:
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
    jobs: JobsSettings = JobsSettings()
    redirects: dict[str, Redirect] = Field(default_factory=dict)
    compat: CompatSettings = CompatSettings()

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        backend_for(value)  # ValueError naming every form the registered backends accept
        return value

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, value: dict[str, Provider]) -> dict[str, Provider]:
        for name in (DELEGATE, DELEGATE_AS, JOBS, ADMIN):
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
        get_token = self.compat.get_token
        if get_token is not None and get_token.provider not in self.providers:
            raise ValueError(f"compat.get_token.provider: no provider named {get_token.provider!r}")
        return self
