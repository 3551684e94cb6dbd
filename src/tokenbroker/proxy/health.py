"""The proxy's health port: ``/health``, ``/healthz``, ``/livez``, ``/readyz``, ``/metrics``.

A separate listener (``health_listen``) so probes and scrapes never queue behind
client connections waiting for a pool token. Plain HTTP/1.1 with keep-alive; request
heads are bounded while they are read (:class:`~tokenbroker.edge.heads.HeadBudget`): over
:data:`~tokenbroker.edge.heads.MAX_HEAD_BYTES`, the answer is 431 and the connection closes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol, cast

import httptools

from ..edge.heads import HeadBudget, HeadTooLargeError
from ..telemetry.metrics import CONTENT_TYPE, ProxyMetrics
from .http import error_reply, status_line

__all__ = ["HealthConnection", "HealthSource"]

_JSON = b"application/json"


class HealthSource(Protocol):
    """What the health port reads of the proxy;
    :class:`~tokenbroker.proxy.server.ProxyServer` implements it.

    Attributes:
        metrics: Rendered for ``/metrics``.
    """

    metrics: ProxyMetrics

    def health(self) -> dict[str, Any]:
        """The ``/health`` document."""

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200."""


class HealthConnection(asyncio.Protocol):
    """One connection to the health port."""

    def __init__(self, server: HealthSource) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._transport: asyncio.Transport | None = None
        self._budget = HeadBudget()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadTooLargeError):
                self._refuse_head()
            else:
                self._send(error_reply(400, "bad_request", "malformed HTTP request", close=True))
                self._close()
            return
        if self._budget.fed(len(data)):
            self._refuse_head()

    def on_message_begin(self) -> None:
        self._url = b""
        self._budget.begin()

    def on_url(self, url: bytes) -> None:
        self._budget.parsed(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._budget.parsed(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self._budget.headers_complete()

    def on_message_complete(self) -> None:
        self._budget.message_complete()
        path = self._url.partition(b"?")[0]
        method = self._parser.get_method()
        keep = self._parser.should_keep_alive()
        if method not in (b"GET", b"HEAD"):
            reply = error_reply(405, "method_not_allowed", "probes answer GET", close=not keep)
        else:
            reply = self._probe(path, keep=keep, head=method == b"HEAD")
        self._send(reply)
        if not keep:
            self._close()

    def _probe(self, path: bytes, *, keep: bool, head: bool) -> bytes:
        server = self._server
        status = 200
        content_type = _JSON
        if path in (b"/health", b"/healthz"):
            # /healthz is tpp's probe path: the same document, not a bare liveness answer.
            body = json.dumps(server.health()).encode()
        elif path == b"/livez":
            body = b'{"status":"ok"}'
        elif path == b"/readyz":
            ready = server.ready()
            status = 200 if ready else 503
            body = b'{"status":"ready"}' if ready else b'{"status":"not_ready"}'
        elif path == b"/metrics":
            body = server.metrics.render()
            content_type = CONTENT_TYPE.encode()
        else:
            return error_reply(404, "not_found", "no such probe", close=not keep)
        head_lines = (
            status_line(status)
            + b"content-type: %b\r\ncontent-length: %d\r\ncache-control: no-store\r\n"
            % (content_type, len(body))
            + (b"connection: close\r\n\r\n" if not keep else b"\r\n")
        )
        return head_lines if head else head_lines + body

    def _refuse_head(self) -> None:
        self._send(error_reply(431, "headers_too_large", "request headers too large", close=True))
        self._close()

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
