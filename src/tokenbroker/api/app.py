"""The broker's HTTP API (DESIGN §3.3): ``create_app(broker)``.

A thin layer: it authenticates the consumer, checks the ACL, calls the
broker, and maps errors to statuses through one table (:data:`ERROR_STATUS`: its own
request errors, then :data:`tokenbroker.edge.statuses.ERROR_STATUS`, which the proxy and
BrokerClient share). Unknown and forbidden providers get the same
byte-identical 404. Every response that carries a token has
``Cache-Control: no-store`` and ``Pragma: no-cache``; no response ever carries a
refresh token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..core.scopes import canonical_scopes, scope_string
from ..core.token import Token
from ..edge.ratelimit import RateLimits
from ..edge.statuses import ERROR_STATUS as DOMAIN_ERROR_STATUS
from ..edge.statuses import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    NOT_FOUND,
    RATE_LIMITED,
    UNAUTHORIZED,
    ErrorStatus,
    retry_after,
)
from ..engine.broker import Broker
from ..engine.cache import DEGRADED
from ..engine.consumers import Consumer, ConsumerRegistry
from ..engine.delegation import check_object, safe_object
from ..errors import InvalidScopeError, StoreError, TokenBrokerError
from ..telemetry.metrics import CONTENT_TYPE, Metrics
from .middleware import RequestContext
from .models import (
    SCOPE_PATTERN,
    DelegationIn,
    DelegationOut,
    ErrorResponse,
    InvalidateIn,
    InvalidateOut,
    ProviderOut,
    ProvidersOut,
    Status,
    TokenOut,
)

__all__ = ["ERROR_STATUS", "create_app"]

logger = logging.getLogger("tokenbroker.app")
audit = logging.getLogger("tokenbroker.audit")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
REALM = 'Bearer realm="tokenbroker"'
#: Paths any client may call without a key.
PUBLIC_PATHS = frozenset(
    {"/livez", "/readyz", "/healthz", "/health", "/metrics", "/.well-known/jwks.json"}
)


class Unauthorized(TokenBrokerError):
    """No valid consumer key was presented."""

    def __init__(self, presented: bool) -> None:
        super().__init__("a valid API key is required")
        self.presented = presented


class RateLimited(TokenBrokerError):
    """Too many requests (or failed key checks); ``retry_after`` says how long to wait."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many requests")
        self.retry_after = retry_after


class InvalidRequest(TokenBrokerError):
    """The request's parameters are malformed."""


class NotFound(TokenBrokerError):
    """The provider does not exist or the consumer may not use it (indistinguishable)."""


#: Error → answer: the API's own request errors, then the table shared with the proxy and
#: BrokerClient (:mod:`tokenbroker.edge.statuses`). The first matching class wins.
ERROR_STATUS: tuple[tuple[type[Exception], ErrorStatus], ...] = (
    (Unauthorized, UNAUTHORIZED),
    (RateLimited, RATE_LIMITED),
    (InvalidRequest, INVALID_REQUEST),
    (NotFound, NOT_FOUND),
    *DOMAIN_ERROR_STATUS,
)


_bearer = HTTPBearer(auto_error=False, description="A consumer API key.")


async def _consumer(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Consumer:
    source = request.client.host if request.client else "unknown"
    key = credentials.credentials if credentials else None
    return authenticate(request.app.state.consumers, request.app.state.limits, key, source)


def authenticate(
    registry: ConsumerRegistry, limits: RateLimits, key: str | None, source: str
) -> Consumer:
    """The consumer presenting ``key`` from ``source``, with rate limits applied.

    The key is checked first: a valid key is served even when ``source`` is over its budget
    of failed key checks (other clients behind the same address must not lock it out); only
    wrong keys are counted, and refused with 429 once over budget.

    Raises:
        RateLimited: A wrong key from a ``source`` over its failed-key budget, or the consumer
            is over its request limit.
        Unauthorized: No or no valid key.
    """
    found = registry.authenticate(key)
    if found is None:
        if key is not None:
            wait = limits.failed(source)
            if wait is not None:
                raise RateLimited(wait)
        raise Unauthorized(presented=key is not None)
    wait = limits.consumer_blocked(found.name)
    if wait is not None:
        raise RateLimited(wait)
    return found


def requested_scope(scope: object) -> str | None:
    """The canonical spelling of a request's scope (None when absent or blank).

    Checked before the provider is looked up, so a malformed scope gets the same 400
    for every provider name.

    Raises:
        InvalidRequest: The scope is not RFC 6749 scope-tokens separated by spaces.
    """
    try:
        return scope_string(scope)
    except InvalidScopeError:
        raise InvalidRequest("invalid request: scope") from None


def check_allowed(broker: Broker, caller: Consumer, provider: str, scope: str | None) -> str:
    """Refuse, as an unknown provider, what ``caller`` may not have.

    The scope is normalised once (:func:`tokenbroker.core.scopes.canonical_scopes`: absent or
    blank means the configured scopes); the ACL checks that value and the caller passes
    the returned spelling of it to the broker, so the token request asks for exactly what
    was checked.

    Returns:
        The scopes checked, space-separated ("" only when none are asked for or configured).

    Raises:
        InvalidRequest: A malformed scope.
        NotFound: Unknown provider, or not allowed (indistinguishable on purpose).
    """
    wanted = requested_scope(scope)
    settings = broker.settings.providers.get(provider)
    if settings is None:
        raise NotFound("no such provider")
    scopes = canonical_scopes(wanted, getattr(settings, "scopes", ()))
    if not caller.allows(provider, scopes):
        raise NotFound("no such provider")
    return " ".join(scopes)


class TokenRead:
    """``GET /v1/tokens/{provider}`` as a plain ASGI endpoint: the hot route, so it skips
    FastAPI's dependency and validation machinery (the FastAPI route of the same path stays
    for the OpenAPI document). Same checks, same error table, same headers.

    Args:
        broker: The broker.
        meter: Metrics.
    """

    _HEADERS = [
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-store"),
        (b"pragma", b"no-cache"),
    ]

    def __init__(self, broker: Broker, meter: Metrics) -> None:
        self.broker = broker
        self.meter = meter
        self._reads: dict[str, Any] = {}
        self.route = Route("/v1/tokens/{provider}", self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # for the request metrics' route label
        if scope["method"] != "GET":
            await _error(405, "method_not_allowed", "method not allowed")(scope, receive, send)
            return
        try:
            caller = self._caller(scope)
            provider: str = scope["path_params"]["provider"]
            query = parse_qs(
                scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
            )
            wanted = query.get("scope", [None])
            account = query.get("account", [None])[-1] or None
            with audited("token read", caller, provider=provider, scope=_shown(wanted)) as line:
                if len(wanted) > 1:
                    raise InvalidRequest("invalid request: scope given more than once")
                if account and len(account) > 256:
                    raise InvalidRequest("invalid request: account too long")
                checked = line["scope"] = check_allowed(self.broker, caller, provider, wanted[0])
                if account:
                    line["account"] = account
                token = await self.broker.aget_token(provider, checked, account=account)
        except TokenBrokerError as exc:
            await error_response(exc)(scope, receive, send)
            return
        body = json.dumps(_token_json(token), separators=(",", ":")).encode()
        headers = [*self._HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        counter = self._reads.get(provider)
        if counter is None:
            counter = self._reads[provider] = self.meter.token_reads.labels(provider)
        counter.inc()

    def _caller(self, scope: Scope) -> Consumer:
        key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                kind, _, credential = value.decode("latin-1").partition(" ")
                key = credential.strip() if kind.lower() == "bearer" and credential else None
                break
        client = scope.get("client")
        app = scope["app"]
        return authenticate(
            app.state.consumers, app.state.limits, key, client[0] if client else "unknown"
        )


Caller = Annotated[Consumer, Depends(_consumer)]


def create_app(
    broker: Broker,
    consumers: ConsumerRegistry | None = None,
    *,
    metrics: Metrics | None = None,
    limits: RateLimits | None = None,
    openapi: bool | None = None,
) -> FastAPI:
    """Build the HTTP API around ``broker``.

    Args:
        broker: The broker to serve.
        consumers: Who may call; default: the ``consumers:`` config section plus the
            consumers in the store (``tokenbroker consumers add``). While the app runs
            (ASGI lifespan) the registry follows its store, so added and removed consumers
            take effect within a second.
        metrics: Prometheus metrics; default: a new registry subscribed to ``broker``.
        limits: Rate limits; default: ``server.rate_limit`` per consumer and
            10 failed key checks a minute per client address.
        openapi: Serve the OpenAPI document at ``/openapi.json``, to consumers with a key
            only; default: ``server.openapi`` (off: the route does not exist).

    Returns:
        The ASGI application.
    """
    registry = consumers
    if registry is None:
        registry = ConsumerRegistry.load(broker.settings.consumers, broker.store)
    meter = metrics or Metrics(broker)
    server = broker.settings.server
    app = FastAPI(
        title="tokenbroker",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by _add_openapi, behind a key, when enabled
        responses={401: {"model": ErrorResponse}},
        lifespan=_following(registry),
    )
    app.state.limits = limits or RateLimits(server.rate_limit)
    origins = list(server.cors_origins)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(RequestContext, metrics=meter)
    _add_token_routes(app, broker, registry, meter)
    _add_probes(app, broker, meter)
    _add_error_handlers(app)
    _document_errors(app)
    if server.openapi if openapi is None else openapi:
        _add_openapi(app)
    return app


def _following(
    registry: ConsumerRegistry,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: the consumer registry follows its store while the app runs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(registry.follow())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan


def _document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what the app does: invalid input is a 400 with our error
    body (not FastAPI's 422), and any route may answer 413 or 429."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        error = {"$ref": "#/components/schemas/ErrorResponse"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                had_body = responses.pop("422", None) is not None
                if had_body:
                    responses["400"] = _described("Invalid request", error)
                    responses["413"] = _described("Request body too large", error)
                if "401" in responses:
                    responses["429"] = _described("Too many requests", error)
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_openapi(app: FastAPI) -> None:
    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(_consumer)])
    async def openapi_document() -> JSONResponse:
        """The OpenAPI document, for consumers only: it maps every route and parameter."""
        return JSONResponse(app.openapi())


def _described(description: str, ref: dict[str, str]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _add_token_routes(
    app: FastAPI, broker: Broker, registry: ConsumerRegistry, meter: Metrics
) -> None:
    app.state.consumers = registry
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (404, 409, 500, 503)
    }

    # The hot route first: same path, plain ASGI; the FastAPI route below documents it.
    app.router.routes.append(TokenRead(broker, meter).route)

    @app.get("/v1/tokens/{provider}", response_model=TokenOut, responses=errors)
    async def get_token(
        provider: str,
        caller: Caller,
        scope: Annotated[str | None, Query(max_length=1024, pattern=SCOPE_PATTERN)] = None,
        account: Annotated[str | None, Query(max_length=256)] = None,
    ) -> JSONResponse:
        """A valid access token for ``provider`` (never a refresh token)."""
        raise AssertionError("served by TokenRead, routed first")  # pragma: no cover

    @app.post("/v1/tokens/{provider}/invalidate", response_model=InvalidateOut, responses=errors)
    async def invalidate(provider: str, body: InvalidateIn, caller: Caller) -> JSONResponse:
        """Report a rejected token: it is dropped only if still current, then the current
        token is returned (one refresh however many consumers report it)."""
        with audited(
            "token invalidate", caller, provider=provider, scope=_shown([body.scope])
        ) as line:
            checked = line["scope"] = check_allowed(broker, caller, provider, body.scope)
            if body.account:
                line["account"] = body.account
            dropped = broker.invalidate(provider, body.access_token, checked, account=body.account)
            token = await broker.aget_token(provider, checked, account=body.account)
        return JSONResponse({**_token_json(token), "invalidated": dropped}, headers=NO_STORE)

    delegation_errors: dict[int | str, dict[str, Any]] = {
        **errors,
        **{code: {"model": ErrorResponse} for code in (400, 403)},
    }

    @app.post("/v1/delegations", response_model=DelegationOut, responses=delegation_errors)
    async def delegations(body: DelegationIn, caller: Caller) -> JSONResponse:
        """A short-lived token for one audience (and object), minted or obtained upstream.

        Needs a ``delegate:PROVIDER`` rule (else the 404 of an unknown provider). The token's
        subject is the consumer's own; naming another needs ``delegate-as:PROVIDER`` (else 403
        ``forbidden_subject``). A malformed object or subject is 400 ``invalid_delegation``.
        """
        with audited(
            "delegation",
            caller,
            provider=body.provider,
            audience=body.audience,
            subject=caller.subject or caller.name if body.subject is None else body.subject,
            object=body.object,
        ) as record:
            if not caller.may_delegate(body.provider):  # audited too, as every refusal is
                raise NotFound("no such provider")
            check_object(body.object)
            token = await broker.adelegate(
                body.provider,
                body.audience,
                object_=body.object,
                subject=caller.delegation_subject(body.provider, body.subject),
                lifetime=body.lifetime_seconds,
                actor=caller.name,
            )
            record["jti"] = token.jti
        return JSONResponse(
            {
                "token": token.token,
                "token_type": token.token_type,
                "expires_at": int(token.expires_at),
                "expires_in": token.expires_in,
                "audience": token.audience,
                "object": token.object,
            },
            headers=NO_STORE,
        )

    @app.get(
        "/v1/redirects/{route}/{path:path}",
        status_code=302,
        response_class=Response,
        responses={
            302: {"description": "To the upstream, with a fresh delegated token."},
            **errors,
        },
    )
    async def redirect(route: str, path: str, caller: Caller) -> Response:
        """``302`` to the route's upstream with a fresh delegated token in ``Location``."""
        spec = broker.settings.redirects.get(route)
        if spec is None or not caller.may_delegate(spec.provider) or not safe_object(path):
            raise NotFound("no such provider")
        subject = caller.delegation_subject(spec.provider)
        with audited(
            "redirect",
            caller,
            route=route,
            provider=spec.provider,
            audience=spec.audience,
            subject=subject,
            object=path,
        ) as record:
            token = await broker.adelegate(
                spec.provider, spec.audience, object_=path, subject=subject, actor=caller.name
            )
            record["jti"] = token.jti
        location = f"{spec.url.rstrip('/')}/{quote(path)}?{urlencode({spec.param: token.token})}"
        return Response(status_code=302, headers={**NO_STORE, "Location": location})

    @app.get("/v1/providers", response_model=ProvidersOut)
    async def providers(caller: Caller) -> ProvidersOut:
        """The providers this consumer may use, each with its worst state over its configured
        scopes and every pool account (as ``/health``); no secrets."""
        states = broker.provider_summaries()
        out = []
        for name in caller.providers():
            settings = broker.settings.providers.get(name)
            if settings is None:
                continue
            slot = states.get(name)
            out.append(
                ProviderOut(
                    name=name,
                    grant=settings.grant,
                    state=slot.state if slot else "empty",
                    valid_until=_int(slot.valid_until) if slot else None,
                    last_refresh=_int(slot.last_refresh) if slot else None,
                    last_error=slot.last_error if slot else None,
                )
            )
        return ProvidersOut(providers=out)


def _add_probes(app: FastAPI, broker: Broker, meter: Metrics) -> None:
    store = _StoreCheck(broker)

    @app.get("/livez", response_model=Status, tags=["probes"])
    async def livez() -> Status:
        """Always 200 while the process serves requests."""
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, tags=["probes"], responses={503: {"model": Status}})
    async def readyz() -> JSONResponse:
        """200 when the store answers and every ``required: true`` provider has a token for its
        configured scopes (tokens consumers asked for with other scopes do not count)."""
        health = await _health(broker, store)
        ready = health.store == "ok" and not broker.unready()
        return JSONResponse(health.model_dump(), status_code=200 if ready else 503)

    @app.get("/health", response_model=Status, tags=["probes"])
    async def health() -> Status:
        """Status with per-provider state; ``degraded`` names what is wrong."""
        return await _health(broker, store)

    app.add_api_route("/healthz", health, methods=["GET"], response_model=Status, tags=["probes"])

    @app.get("/.well-known/jwks.json", tags=["probes"])
    async def jwks() -> JSONResponse:
        """Public keys that verify the broker's delegated JWTs (RFC 7517)."""
        keys = await asyncio.to_thread(broker.jwks)
        return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})

    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics_endpoint() -> Response:
        """Prometheus metrics."""
        return Response(meter.render(), media_type=CONTENT_TYPE)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TokenBrokerError)
    async def domain_error(request: Request, exc: TokenBrokerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = sorted({".".join(str(p) for p in e["loc"][1:]) for e in exc.errors()})
        message = "invalid request: " + ", ".join(f or "body" for f in fields)
        return _error(400, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(404, "not_found", "no such route")
        if exc.status_code == 405:
            return _error(405, "method_not_allowed", "method not allowed")
        return _error(exc.status_code, "http_error", "request failed")


@contextlib.contextmanager
def audited(event: str, caller: Consumer, **fields: object) -> Iterator[dict[str, object]]:
    """One audit line for what happens inside: consumer, fields, and the outcome
    (``ok`` or the error code). Fields are names, scopes, subjects, objects and token ids
    (``jti``), never tokens. A value with anything but visible ASCII (a space, a newline, a
    quote) is written JSON-quoted, so no input can forge a field or a line.

    Yields:
        The fields, for the block to replace what was asked with what was served (the
        normalised scope, the account) or add to them, before the line is written at the end.
    """
    record: dict[str, object] = dict(fields)

    def line(outcome: str) -> None:
        details = " ".join(f"{name}={_audit_value(value)}" for name, value in record.items())
        audit.info("%s consumer=%s %s outcome=%s", event, caller.name, details, outcome)

    try:
        yield record
    except TokenBrokerError as exc:
        line(_code(exc))
        raise
    line("ok")


def _audit_value(value: object) -> str:
    text = str(value)
    if text and all("\x21" <= c <= "\x7e" and c != '"' for c in text):
        return text
    return json.dumps(text)


def _status(exc: BaseException) -> ErrorStatus | None:
    return next((row for kind, row in ERROR_STATUS if isinstance(exc, kind)), None)


def _code(exc: BaseException) -> str:
    return (_status(exc) or INTERNAL_ERROR).code


def error_response(exc: BaseException) -> JSONResponse:
    """The response for an error, from :data:`ERROR_STATUS` (500 ``internal_error`` if unmapped)."""
    row = _status(exc)
    if row is None:
        logger.error("unmapped error %s", type(exc).__name__)
        row = INTERNAL_ERROR
    headers: dict[str, str] = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = f'{REALM}, error="invalid_token"' if exc.presented else REALM
    if row.retry_after:
        headers["Retry-After"] = str(retry_after(exc))
    return _error(row.status, row.code, row.message, headers)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=status,
        headers={**NO_STORE, **(headers or {})},
    )


def _token_json(token: Token) -> dict[str, Any]:
    return {
        "access_token": token.access_token,
        "token_type": token.token_type,
        "expires_at": int(token.expires_at),
        "expires_in": token.expires_in,
        "scope": token.scope,
    }


def _shown(values: list[str | None]) -> str | None:
    """A request's scope for the audit line: canonical, or ``<invalid>`` (never raw input,
    which could carry a newline into the log)."""
    try:
        return " | ".join(str(scope_string(value)) for value in values)
    except InvalidScopeError:
        return "<invalid>"


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


class _StoreCheck:
    """Asks the store for its clock in a worker thread, never on the event loop (a store
    waiting out a lock would stall every request); probes arriving meanwhile share one check."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._running: asyncio.Future[str] | None = None

    async def __call__(self) -> str:
        running = self._running
        if running is None:
            running = self._running = asyncio.ensure_future(asyncio.to_thread(self._check))
            running.add_done_callback(self._done)
        return await asyncio.shield(running)

    def _done(self, running: asyncio.Future[str]) -> None:
        self._running = None

    def _check(self) -> str:
        try:
            self._broker.store.now()
        except StoreError:
            return "error"
        return "ok"


async def _health(broker: Broker, store: _StoreCheck) -> Status:
    """The store's answer and each provider's worst state over its configured scopes and every
    pool account; ``degraded`` when the store fails or a provider is stale, failed or needs
    reauthorization."""
    state = await store()
    providers = broker.provider_states()
    bad = state != "ok" or any(value in DEGRADED for value in providers.values())
    return Status(status="degraded" if bad else "ok", store=state, providers=providers)
