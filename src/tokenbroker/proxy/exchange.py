"""One request through the proxy: take a token, send it upstream, relay the answer.

An :class:`Exchange` is created when a request's headers are parsed. Its
:meth:`run` coroutine picks the route, leases or reads the token, sends the head
and body upstream and waits for the outcome; the response itself streams through
the :class:`~tokenbroker.proxy.upstream.ResponseSink` callbacks without waiting
for the coroutine. A 401 on a replayable request (no body, or one small enough to
keep) is swallowed once: the token is reported rejected (compare-and-invalidate),
a new one is read, and the request is sent again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

from ..errors import ProviderError, ReauthorizationRequiredError
from ..pool import Lease, PoolExhaustedError
from ..token import Token
from .http import (
    HOP_BY_HOP,
    LAST_CHUNK,
    chunk,
    connection_tokens,
    error_reply,
    is_unsafe_path,
    status_line,
)
from .upstream import Outcome, UpstreamConnection, UpstreamError

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .routes import Route

__all__ = ["Exchange"]

logger = logging.getLogger("tokenbroker.proxy")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = (204, 304)
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close"})
# RFC 9110 §9.2.2: only these are sent again after a connection failed under them.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})


class Exchange:
    """One request on a client connection and its response (a ``ResponseSink``).

    Args:
        conn: The client connection.
        method: The request method.
        target: The request target (path and query) as received.
        headers: The request's headers with the hop-by-hop ones already removed.
        version: ``b"1.1"`` or ``b"1.0"``.
        keep_alive: The client wants the connection kept open.
        content_length: The declared body length, if any.
        chunked: The body uses the chunked coding.
        expect_continue: The client waits for ``100 Continue`` before its body.
        key: The consumer key header's value, if any.
    """

    def __init__(
        self,
        conn: ClientConnection,
        method: bytes,
        target: bytes,
        headers: list[bytes],
        version: bytes,
        *,
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
        expect_continue: bool,
        key: str | None,
    ) -> None:
        self.conn = conn
        self.method = method
        self.target = target
        self.header_lines = headers
        self.version = version
        self.close_after = not keep_alive
        self.content_length = content_length
        self.chunked_in = chunked
        self.expect_continue = expect_continue
        self.key = key
        self.head_only = method == b"HEAD"
        self.idempotent = method in _IDEMPOTENT
        self.body: list[bytes] = []
        self.buffered = 0
        self.body_done = not chunked and not content_length
        self.replayable = self.body_done or (
            not chunked
            and content_length is not None
            and content_length <= conn.server.settings.replay_body_bytes
        )
        self.upstream: UpstreamConnection | None = None
        self.streaming = False
        self.responded = False
        self.can_retry = False
        self.done = False
        self.status = 0
        self.framed = True
        self._chunked_out = False
        self._body_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    # -- request body, fed by the client connection ------------------------------------------

    def request_body(self, data: bytes) -> None:
        """A piece of the request body arrived from the client."""
        if self.done:  # answered early; the rest of the body is read and dropped
            return
        upstream = self.upstream
        if self.streaming and upstream is not None:
            upstream.send(chunk(data) if self.chunked_in else data)
            if upstream.write_paused:
                self.conn.pause_reading("upstream")
                upstream.when_drained(lambda: self.conn.resume_reading("upstream"))
            return
        self.body.append(data)
        self.buffered += len(data)
        if not self.replayable and self.buffered >= 65_536:
            self.conn.pause_reading("buffer")

    def request_end(self) -> None:
        """The request body is complete."""
        self.body_done = True
        upstream = self.upstream
        if self.streaming and upstream is not None:
            if self.chunked_in:
                upstream.send(LAST_CHUNK)
            upstream.sent()
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the exchange -----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the request; always ends by handing the connection its next request."""
        conn = self.conn
        lease: Lease | None = None
        try:
            route = self._route()
            if route is None:
                return
            if route.pool is not None:
                lease = await conn.lease(route)
                lease.begin()
                token = await lease.token()
            else:
                token = await conn.server.broker.aget_token(route.provider, route.scope)
            if self.expect_continue and not self.body_done:
                conn.write(_CONTINUE)
                conn.flush()
            if self.replayable and not self.body_done:
                self._body_waiter = asyncio.get_running_loop().create_future()
                await self._body_waiter
            await self._relay(route, token, lease)
        except PoolExhaustedError as exc:
            self._fail(503, "pool_exhausted", str(exc), retry_after=math.ceil(exc.retry_after or 1))
        except ReauthorizationRequiredError:
            self._fail(502, "reauthorization_required", "the provider needs a new authorization")
        except ProviderError as exc:
            retry_after = getattr(exc, "retry_after", None)
            self._fail(
                503, "provider_unavailable", "no token is available", retry_after=retry_after
            )
        except UpstreamError as exc:
            if self.responded:
                conn.abort()
            elif exc.timeout:
                self._fail(504, "upstream_timeout", str(exc))
            else:
                self._fail(502, "upstream_unavailable", str(exc))
        finally:
            upstream = self.upstream
            if upstream is not None:  # abandoned mid-way (cancelled)
                self.upstream = None
                upstream.detach()
                upstream.abort()
            if lease is not None and lease.in_flight:
                lease.end()
            self.done = True
            self.body.clear()
            conn.finished(self)

    async def _relay(self, route: Route, token: Token, lease: Lease | None) -> None:
        conn = self.conn
        timeout = conn.server.settings.upstream_timeout_seconds
        rejected = stale = False
        while True:
            self.can_retry = self.replayable and not rejected
            upstream = await route.upstream.acquire(fresh=stale)
            self.upstream = upstream
            data = [self._head(route, token)]
            data.extend([chunk(piece) for piece in self.body] if self.chunked_in else self.body)
            if self.body_done and self.chunked_in:
                data.append(LAST_CHUNK)
            if not self.replayable:
                self.body.clear()
                self.streaming = True
                conn.resume_reading("buffer")
            outcome = upstream.start(self, data, timeout)
            if self.body_done:
                upstream.sent()
            if conn.write_paused:
                upstream.pause_reading()
            try:
                result = await outcome
            except UpstreamError as exc:
                self.upstream = None
                retry = exc.replayable and self.idempotent and self.replayable
                if retry and not stale and not self.responded:
                    stale = True
                    continue
                raise
            self.upstream = None
            self.streaming = False
            if self.body_done and upstream.reusable:
                route.upstream.release(upstream)
            else:
                upstream.detach()
                upstream.close()
            if result is Outcome.RELAYED:
                if not self.body_done:  # answered before the whole body came: don't reuse
                    self.close_after = True
                return
            rejected = True  # a 401 swallowed once: drop that token, send again with the next
            conn.server.count_rejected(route)
            if lease is not None:
                lease.report_rejected(token.access_token)
                token = await lease.token()
            else:
                conn.server.broker.invalidate(route.provider, token.access_token, route.scope)
                token = await conn.server.broker.aget_token(route.provider, route.scope)

    def _route(self) -> Route | None:
        """The route for this request, or None after answering with an error."""
        path, _, _ = self.target.partition(b"?")
        if not path.startswith(b"/"):  # absolute-form or '*': not for a reverse proxy
            self.close_after = True
            self._fail(400, "bad_request", "the request target must be an absolute path")
            return None
        if is_unsafe_path(path):
            self._fail(400, "bad_path", "the path has a traversal or ambiguous form")
            return None
        server = self.conn.server
        route = server.routes.match(path)
        consumers = server.consumers
        if consumers is not None:
            consumer = consumers.authenticate(self.key)
            if consumer is None:
                self._fail(401, "unauthorized", "a valid consumer key is required")
                return None
            if route is not None and not consumer.allows(route.provider):
                route = None
        if route is None:
            self._fail(404, "no_route", "no route serves this path")
        return route

    def _head(self, route: Route, token: Token) -> bytes:
        path, sep, query = self.target.partition(b"?")
        lines = [
            b"%b %b%b%b HTTP/1.1\r\nhost: %b\r\n"
            % (self.method, route.target(path), sep, query, route.host),
            *self.header_lines,
            b"authorization: %b\r\n" % token.authorization.encode(),
        ]
        if self.chunked_in:
            lines.append(b"transfer-encoding: chunked\r\n")
        elif self.content_length is not None:
            lines.append(b"content-length: %d\r\n" % self.content_length)
        lines.append(self.conn.forwarded)
        return b"".join(lines)

    def _fail(
        self, status: int, code: str, message: str, *, retry_after: int | None = None
    ) -> None:
        """Answer with an error, unless a response has begun (then drop the connection)."""
        if self.responded:
            self.conn.abort()
            return
        if not self.body_done:
            self.close_after = True  # the unread body is still on the wire
        self.status = status
        self.responded = True
        self.conn.server.count_status(status)
        self.conn.write(
            error_reply(status, code, message, close=self.close_after, retry_after=retry_after)
        )
        self.conn.flush()

    # -- ResponseSink -------------------------------------------------------------------------

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        """Relay the upstream's status and end-to-end headers (re-framed for the client)."""
        lines = [status_line(status, self.version)]
        length = chunked = False
        listed: set[bytes] | None = None
        for name, value in headers:
            lower = name.lower()
            if lower in HOP_BY_HOP:
                if lower == b"transfer-encoding":
                    chunked = True
                elif lower == b"connection":
                    listed = connection_tokens(value) - _CONNECTION_OPTIONS
                continue
            if lower == b"content-length":
                length = True
            lines.append(b"%b: %b\r\n" % (name, value))
        self.framed = length or chunked
        if status == 401 and self.can_retry:
            return False
        if listed:  # rare: drop the headers the upstream's Connection header names
            lines = [line for line in lines if line.split(b":", 1)[0].lower() not in listed]
        self.status = status
        self.responded = True
        self.conn.server.count_status(status)
        if (chunked or not length) and not self.head_only and status not in _NO_BODY_STATUS:
            if self.version == b"1.1":  # re-chunk what we relay piece by piece
                self._chunked_out = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.close_after = True  # HTTP/1.0: the close delimits the body
        if self.close_after:
            lines.append(b"connection: close\r\n\r\n")
        elif self.version == b"1.0":
            lines.append(b"connection: keep-alive\r\n\r\n")
        else:
            lines.append(b"\r\n")
        self.conn.write(b"".join(lines))
        return True

    def response_body(self, data: bytes) -> None:
        """Relay a piece of the response body."""
        self.conn.write(chunk(data) if self._chunked_out else data)

    def response_end(self, *, eof: bool) -> None:
        """The response is complete."""
        if self._chunked_out:
            self.conn.write(LAST_CHUNK)

    def flush(self) -> None:
        """Write out what one upstream read produced."""
        self.conn.flush()

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} status={self.status}>"
