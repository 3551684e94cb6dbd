"""Pure ASGI middleware (STYLE 10): request ids, body limits, access logs, request metrics."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..edge.heads import HEADERS_TOO_LARGE, MAX_HEAD_BYTES
from ..telemetry.logs import request_id as current_request_id
from ..telemetry.metrics import Metrics

__all__ = ["MAX_BODY_BYTES", "MAX_HEADER_BYTES", "RequestContext"]

logger = logging.getLogger("tokenbroker.access")
MAX_BODY_BYTES = 64 * 1024
#: Checked here for any ASGI server; ``serve``'s protocol enforces it while reading.
MAX_HEADER_BYTES = MAX_HEAD_BYTES

_TOO_LARGE = json.dumps(
    {"error": {"code": "payload_too_large", "message": "request body too large"}}
).encode()


class RequestContext:
    """Gives every request an id, refuses headers over :data:`MAX_HEADER_BYTES` with 431 and
    bodies over :data:`MAX_BODY_BYTES` with 413,
    counts requests by route template and status, and writes one access log line.

    Args:
        app: The wrapped application.
        metrics: Where request counts go.
        max_body: Largest accepted request body in bytes.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self._counters: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = os.urandom(8).hex()
        token = current_request_id.set(request_id)
        started = time.perf_counter()
        status = 500
        header_bytes = 0
        declared: int | None = None
        has_body = False
        for name, value in scope.get("headers", ()):
            header_bytes += len(name) + len(value) + 4
            if name == b"content-length":
                has_body = True
                declared = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                has_body = True
        refused = 431 if header_bytes > MAX_HEADER_BYTES else None
        if refused is None and declared is not None and declared > self.max_body:
            refused = 413
        if refused is not None:
            await _reject(send, request_id, refused)
            self._done(scope, refused, started, request_id)
            current_request_id.reset(token)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"x-request-id", id_bytes)],
                }
            await send(message)

        id_bytes = request_id.encode()
        try:
            await self.app(scope, limited_receive if has_body else receive, send_with_id)
        except _BodyTooLarge:
            status = 413
            await _reject(send, request_id, 413)
        finally:
            self._done(scope, status, started, request_id)
            current_request_id.reset(token)

    def _done(self, scope: Scope, status: int, started: float, request_id: str) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        counter = self._counters.get((template, status))
        if counter is None:
            counter = self._counters[template, status] = self.metrics.consumer_requests.labels(
                template, str(status)
            )
        counter.inc()
        if not logger.isEnabledFor(logging.DEBUG):
            return
        # Debug only: token reads and delegations have their own audit line at info.
        logger.debug(
            "request id=%s method=%s route=%s status=%d duration_ms=%.1f",
            request_id,
            scope.get("method"),
            template,
            status,
            (time.perf_counter() - started) * 1000,
        )


class _BodyTooLarge(Exception):
    pass


async def _reject(send: Send, request_id: str, status: int) -> None:
    body = HEADERS_TOO_LARGE if status == 431 else _TOO_LARGE
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
