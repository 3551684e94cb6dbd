"""Which route serves a request, and the answers the proxy gives itself.

:func:`admit` runs the checks a request passes before a token is read for it;
:func:`answer_error` writes the house error reply (or drops the connection when a
response has already begun). Both run off the fast path of
:class:`~tokenbroker.proxy.exchange.ProxiedRequest`, which does its own cheap checks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..edge.statuses import RATE_LIMITED
from .http import NEVER_FORWARDED, error_reply, is_unsafe_path

if TYPE_CHECKING:
    from ..edge.ratelimit import RateLimits
    from .exchange import ProxiedRequest
    from .routes import Route

__all__ = ["admit", "answer_error"]

_NO_ROUTE_FOR_KEY = "no route serves this path for this key"


def admit(request: ProxiedRequest) -> Route | None:
    """The route for this request, or None after answering with an error.

    In order: TRACE and CONNECT (405, whatever the route, as nginx answers), the
    target's form and path (400), the consumer key (401, or 429 once the client's
    address is over its budget of wrong keys), the route (404), the route's methods
    (405 with ``Allow``).
    """
    if request.method in NEVER_FORWARDED:
        answer_error(request, 405, "method_not_allowed", "TRACE and CONNECT are never forwarded")
        return None
    path, _, _ = request.target.partition(b"?")
    if not path.startswith(b"/"):  # absolute-form or '*': not for a reverse proxy
        request.close_after = True
        answer_error(request, 400, "bad_request", "the request target must be an absolute path")
        return None
    if is_unsafe_path(path):
        answer_error(request, 400, "bad_path", "the path has a traversal or ambiguous form")
        return None
    server = request.conn.server
    route = server.routes.match(path)
    consumers = server.consumers
    if consumers is not None:
        consumer = consumers.authenticate(request.key)
        if consumer is None:
            _refuse_key(request, server.limits)
            return None
        if route is not None and not consumer.allows(route.provider, route.scopes):
            route = None
    if route is None:
        # With consumer keys a route the key may not use gets these same bytes, so say both.
        why = "no route serves this path" if consumers is None else _NO_ROUTE_FOR_KEY
        answer_error(request, 404, "no_route", why)
        return None
    if request.method not in route.methods:
        answer_error(
            request,
            405,
            "method_not_allowed",
            "this route does not forward the request's method",
            extra=((b"allow", route.allow),),
        )
        return None
    return route


def _refuse_key(request: ProxiedRequest, limits: RateLimits) -> None:
    """Answer a missing or wrong consumer key as the API does: a wrong key counts
    against the client address's budget (:meth:`RateLimits.failed`), and once over
    it the answer is 429 with ``Retry-After`` instead of 401."""
    wait: float | None = None
    if request.key is not None:
        address = request.conn.peer.rpartition(":")[0]  # "host:port"; IPv6 keeps its colons
        wait = limits.failed(address or request.conn.peer)
    if wait is None:
        answer_error(request, 401, "unauthorized", "a valid consumer key is required")
    else:
        row = RATE_LIMITED
        answer_error(request, row.status, row.code, row.message, retry_after=math.ceil(wait))


def answer_error(
    request: ProxiedRequest,
    status: int,
    code: str,
    message: str,
    *,
    retry_after: int | None = None,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """Answer ``request`` with an error, unless a response has begun (then drop the
    connection). An answer before the whole request body came closes the connection."""
    if request.responded:
        request.conn.abort()
        return
    if not request.body_done:
        request.close_after = True  # the unread body is still on the wire
    request.status = status
    request.responded = True
    request.conn.server.count_status(status)
    request.conn.write(
        error_reply(
            status,
            code,
            message,
            close=request.close_after,
            retry_after=retry_after,
            extra=extra,
        )
    )
    request.conn.flush()
