"""Proxied request spans, while tracing is on (off, the proxy never calls this module).

One ``tokenbroker.proxy`` server span per proxied request, from its parsed head to its
end (relayed, answered with an error, or abandoned). A ``traceparent`` header from the
client continues the client's trace and is replaced, toward the upstream, by this span's
own (so the upstream's work is a child of the proxied request). Attributes:
``http.request.method``, ``http.route`` (the route's prefix; never the path or its query),
``http.response.status_code`` (what the client got: the upstream's status, or the proxy's
own error), ``tokenbroker.route.provider``, ``tokenbroker.lease.wait_ms`` (how long the
request waited for a pool account; 0 when its connection already held one),
``tokenbroker.account.index`` (the leased account's position in the provider's
``credentials``; never the account's name) and ``tokenbroker.retried_after_401``.
Token acquisitions made for the request are its children.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

from ..core.tracing import Started, Tracer

if TYPE_CHECKING:
    from .exchange import ProxiedRequest

__all__ = ["RequestSpan", "finish", "start"]

_TRACEPARENT = b"traceparent:"
_T = (ord("t"), ord("T"))
_NONE_HELD: frozenset[int] = frozenset()


class RequestSpan:
    """A proxied request's span and what its end needs to know.

    Attributes:
        span: The span.
        context: A context in which the span is current (the request's task runs in it).
        held: The leases the connection held before the request (ids).
        retried: The upstream's 401 was swallowed and the request sent again.
    """

    __slots__ = ("held", "retried", "span")

    def __init__(self, span: Started, held: frozenset[int]) -> None:
        self.span = span
        self.held = held
        self.retried = False

    @property
    def context(self) -> contextvars.Context:
        """A context in which the span is current (the request's task runs in it); an
        unsampled span builds it only when asked (the fast path never asks)."""
        return self.span.context

    def __repr__(self) -> str:
        return f"<RequestSpan retried={self.retried}>"


def start(request: ProxiedRequest, tracer: Tracer) -> RequestSpan:
    """Start ``request``'s span; its ``traceparent`` replaces the client's toward the upstream.

    Args:
        request: A request whose head was just parsed.
        tracer: The installed tracer.

    Returns:
        The span, to keep as ``request.trace``.
    """
    parent: str | None = None
    lines = request.header_lines
    for index, line in enumerate(lines):
        # The first byte first: a slice and a lower-cased copy only for a t/T line.
        if line[0] in _T and line[:12].lower() == _TRACEPARENT:
            parent = line[12:].strip().decode("latin-1")
            del lines[index]
            break
    span = tracer.start("tokenbroker.proxy", None, traceparent=parent, kind="server")
    lines.append(b"traceparent: %b\r\n" % span.traceparent().encode())
    if not span.recording:  # sampled out: nothing more of it is read
        return RequestSpan(span, _NONE_HELD)
    span.set("http.request.method", request.method.decode("latin-1"))
    # Leases this connection held before the request: one taken later was waited for here.
    return RequestSpan(span, frozenset(map(id, request.conn.leases.values())))


def finish(request: ProxiedRequest) -> None:
    """End ``request``'s span (once; later calls do nothing) with its outcome's attributes."""
    trace = request.trace
    if trace is None:
        return
    request.trace = None
    span = trace.span
    if not span.recording:  # sampled out: nothing of this would be exported
        span.end()
        return
    server = request.conn.server
    route = server.routes.match(request.target.partition(b"?")[0])
    if route is not None:
        span.set("http.route", route.spec.prefix)
        span.set("tokenbroker.route.provider", route.provider)
        lease = request.conn.leases.get(route)
        account = lease.account if lease is not None else None
        if lease is not None and account is not None:
            waited = 0.0
            if id(lease) not in trace.held:
                waited = max(lease.acquired_at - lease.requested_at, 0.0)
            span.set("tokenbroker.lease.wait_ms", round(waited * 1000, 3))
            accounts = server.broker.accounts(route.provider)
            if account in accounts:
                span.set("tokenbroker.account.index", accounts.index(account))
    span.set("http.response.status_code", request.status)
    span.set("tokenbroker.retried_after_401", trace.retried)
    if request.status >= 500:
        span.fail(f"HTTP {request.status}")
    span.end()
