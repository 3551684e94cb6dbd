"""Who may call the API, and for what: consumer keys, the failed-key limiter, the ACL.

Every route but :data:`PUBLIC_PATHS` and :data:`STATE_PATHS` needs a consumer key
(``Authorization: Bearer KEY``).
:func:`authenticate` turns the key into a :class:`~tokenbroker.engine.consumers.Consumer`
(FastAPI routes take it as a :data:`Caller` parameter, the plain-ASGI token read calls
:func:`scope_caller`); :func:`check_allowed` refuses, as an unknown provider, what that
consumer may not have, so unknown and forbidden providers get the same byte-identical 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Scope

from ..core import tracing
from ..core.scopes import canonical_scopes, scope_string
from ..edge.ratelimit import RateLimits
from ..engine.broker import Broker
from ..engine.consumers import Consumer, ConsumerRegistry
from ..errors import InvalidDelegationError, InvalidScopeError
from .connection import PEER
from .errors import InvalidRequest, NotFound, RateLimited, Unauthorized

__all__ = [
    "PUBLIC_PATHS",
    "STATE_PATHS",
    "Caller",
    "aauthenticate",
    "authenticate",
    "check_allowed",
    "consumer",
    "following",
    "forwarded_user",
    "requested_scope",
    "scope_caller",
    "trusted_networks",
]

#: A network of ``server.trusted_proxies``.
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Paths any client may call without a key.
PUBLIC_PATHS = frozenset(
    {"/livez", "/readyz", "/healthz", "/health", "/metrics", "/.well-known/jwks.json"}
)

#: Paths a person's browser calls with a single-use credential of their own instead of a
#: key: the OAuth callback of an ``authorize`` job, whose ``state`` is the credential (a
#: request without a valid one is a 400 page).
STATE_PATHS = frozenset({"/v1/oauth/callback"})

_bearer = HTTPBearer(auto_error=False, description="A consumer API key.")


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
    tracing.annotate("consumer", found.name)
    wait = limits.consumer_blocked(found.name)
    if wait is not None:
        raise RateLimited(wait)
    return found


async def aauthenticate(
    registry: ConsumerRegistry, limits: RateLimits, key: str | None, source: str
) -> Consumer:
    """:func:`authenticate` for a request on the event loop: the shared (Redis) counts are
    awaited without blocking the loop and for at most the link's short budget, so a paused
    Redis never holds up a token read (cluster mode; the in-process counts apply instead).

    Raises:
        RateLimited: As for :func:`authenticate`.
        Unauthorized: As for :func:`authenticate`.
    """
    found = registry.authenticate(key)
    if found is None:
        if key is not None:
            wait = await limits.afailed(source)
            if wait is not None:
                raise RateLimited(wait)
        raise Unauthorized(presented=key is not None)
    tracing.annotate("consumer", found.name)
    wait = await limits.aconsumer_blocked(found.name)
    if wait is not None:
        raise RateLimited(wait)
    return found


async def consumer(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Consumer:
    """The FastAPI dependency behind :data:`Caller`: :func:`authenticate` with the app's
    registry and limits (``app.state.consumers``, ``app.state.limits``).

    Raises:
        RateLimited: As for :func:`authenticate`.
        Unauthorized: As for :func:`authenticate`.
    """
    source = request.client.host if request.client else "unknown"
    key = credentials.credentials if credentials else None
    return await aauthenticate(request.app.state.consumers, request.app.state.limits, key, source)


#: A route parameter of this type is the authenticated consumer (and documents the key).
Caller = Annotated[Consumer, Depends(consumer)]


async def scope_caller(scope: Scope) -> Consumer:
    """:func:`aauthenticate` for a plain ASGI request: the ``Authorization: Bearer`` key of
    ``scope``, checked against ``scope["app"]``'s registry and limits.

    Raises:
        RateLimited: As for :func:`authenticate`.
        Unauthorized: As for :func:`authenticate`.
    """
    key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, credential = value.decode("latin-1").partition(" ")
            key = credential.strip() if kind.lower() == "bearer" and credential else None
            break
    client = scope.get("client")
    app = scope["app"]
    return await aauthenticate(
        app.state.consumers, app.state.limits, key, client[0] if client else "unknown"
    )


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
        raise NotFound("no such provider or scope for this key")
    scopes = canonical_scopes(wanted, getattr(settings, "scopes", ()))
    if not caller.allows(provider, scopes):
        raise NotFound("no such provider or scope for this key")
    return " ".join(scopes)


def following(
    registry: ConsumerRegistry,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: the consumer registry follows its store while the app runs, so
    added and removed consumers take effect within a second; ``on_shutdown`` is awaited
    when the app stops (the status feed's)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(registry.follow())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if on_shutdown is not None:
                await on_shutdown()

    return lifespan


def trusted_networks(proxies: Iterable[str]) -> tuple[Network, ...]:
    """``server.trusted_proxies`` (addresses or CIDR networks, validated by the config) as
    networks for :func:`forwarded_user`."""
    return tuple(ipaddress.ip_network(proxy) for proxy in proxies)


def forwarded_user(scope: Scope, trusted: tuple[Network, ...]) -> str | None:
    """The user a trusted front end names in ``X-Forwarded-User``, if any.

    Believed only when the TCP peer (the scope's :data:`~tokenbroker.api.connection.PEER`,
    else its ``client``) is in ``trusted``: the peer, not ``client``, because uvicorn rewrites
    ``client`` from ``X-Forwarded-For``, which any caller may send. From any other peer the
    header is ignored, as ``X-Forwarded-For`` is. The user is only a requested subject: the
    consumer's delegation rules still decide whether it may have it.

    Args:
        scope: The request's ASGI scope.
        trusted: From :func:`trusted_networks`; empty: the header is never believed.

    Returns:
        The header's value, stripped; None when absent, empty or not believed.

    Raises:
        InvalidDelegationError: A trusted peer sent the header more than once.
    """
    if not trusted:
        return None
    peer = scope.get(PEER, scope.get("client"))
    try:
        address = ipaddress.ip_address(peer[0]) if peer else None
    except ValueError:
        return None
    if address is None or not any(address in network for network in trusted):
        return None
    values = [v for name, v in scope["headers"] if name == b"x-forwarded-user"]
    if len(values) > 1:
        raise InvalidDelegationError("X-Forwarded-User was sent more than once")
    user = values[0].decode("latin-1").strip() if values else ""
    return user or None
