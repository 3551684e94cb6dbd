"""The API's request spans (pure ASGI, STYLE 10): one ``tokenbroker.api`` server span per
HTTP request while tracing is on; off, one attribute test per request and nothing else.

A ``traceparent`` header continues the caller's trace. Attributes: ``http.request.method``,
``http.route`` (the route template, never the path: a path can name a provider or an
object), ``http.response.status_code`` and ``consumer`` (the authenticated consumer's name,
set by :func:`~tokenbroker.api.access.authenticate`; never the key).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core import tracing

__all__ = ["TraceRequests"]

_CARRIED = (b"traceparent", b"tracestate")


class TraceRequests:
    """Wraps each HTTP request in a span when a tracer is installed.

    Args:
        app: The wrapped application.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if tracing.tracer is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in _CARRIED
        }
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        attributes = {"http.request.method": str(scope.get("method", ""))}
        with tracing.span("tokenbroker.api", attributes, carrier=carrier, kind="server") as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                span.set("http.route", getattr(route, "path", None) or "unmatched")
                span.set("http.response.status_code", status)
                if status >= 500:
                    span.fail(f"HTTP {status}")
