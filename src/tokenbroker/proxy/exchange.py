"""One request through the proxy: take a token, send it upstream, relay the answer.

A :class:`ProxiedRequest` is created when a request's headers are parsed. Its
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
from typing import TYPE_CHECKING

from ..core import tracing
from ..core.token import Token
from ..errors import TokenBrokerError
from .admission import admit, answer_error
from .http import (
    HOP_LINE,
    LAST_CHUNK,
    authorization_line,
    chunk,
    domain_error,
    is_unsafe_path,
    reframed,
)
from .lease import PoolLease
from .spans import RequestSpan, finish, start
from .upstream import Outcome, UpstreamConnection, UpstreamError

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .routes import Route

__all__ = ["ProxiedRequest"]

_Resume = tuple["Route", Token, PoolLease | None, "Outcome | UpstreamError"]

logger = logging.getLogger("tokenbroker.proxy")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = (204, 304)
# RFC 9110 §9.2.2: only these are sent again after a connection failed under them.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})


class ProxiedRequest:
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

    __slots__ = (
        "_body_waiter",
        "_chunked_out",
        "_fast_state",
        "_lease",
        "_waiter",
        "bodiless",
        "body",
        "body_done",
        "buffered",
        "can_retry",
        "chunked_in",
        "close_after",
        "conn",
        "content_length",
        "done",
        "expect_continue",
        "framed",
        "head_only",
        "header_lines",
        "idempotent",
        "key",
        "method",
        "replayable",
        "responded",
        "status",
        "streaming",
        "target",
        "task",
        "trace",
        "upstream",
        "version",
    )

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
        self.bodiless = not chunked and not content_length
        self.body_done = self.bodiless
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
        self._waiter: asyncio.Future[Outcome | UpstreamError] | None = None
        self._fast_state: tuple[Route, Token, PoolLease | None] | None = None
        self._lease: PoolLease | None = None
        self.task: asyncio.Task[None] | None = None
        self.trace: RequestSpan | None = None

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

    def begin(self) -> None:
        """Start serving: at once when everything is at hand, else as a task.

        The fast path (no body, a held lease or shared route, a fresh cached token, an
        idle upstream connection) sends the request without a task or a future; the
        response completes it from the upstream's callbacks. Anything else, and any
        outcome but a relayed response, goes through :meth:`run`.
        """
        trace = self.trace = start(self, tracing.tracer) if tracing.tracer is not None else None
        if not (self.bodiless and self._fast()):
            context = trace.context if trace is not None else None
            self.task = self.conn.loop.create_task(self.run(), context=context)

    def _fast(self) -> bool:
        conn = self.conn
        server = conn.server
        if server.consumers is not None:
            return False
        path = self.target.partition(b"?")[0]
        route = conn.last_route
        if route is None or path != conn.last_path:  # clients repeat paths: check once
            if not path.startswith(b"/") or is_unsafe_path(path):
                return False
            route = server.routes.match(path)
            if route is None:
                return False
            conn.last_route, conn.last_path = route, path
        if self.method not in route.methods:
            return False
        lease = None
        if route.pool is not None:
            lease = conn.leases.get(route)
            token = lease.token_nowait() if lease is not None else None
        else:
            token = server.broker.peek_token(route.provider, route.scope)
        if token is None:
            return False
        upstream = route.upstream.take_idle()
        if upstream is None:
            return False
        if lease is not None:
            lease.begin()
            self._lease = lease
        self._fast_state = (route, token, lease)
        self.can_retry = True
        self.upstream = upstream
        upstream.start(
            self, [self._head(route, token)], server.settings.upstream_timeout_seconds, sent=True
        )
        if conn.write_paused:
            upstream.pause_reading()
        return True

    def _fast_done(self, result: Outcome | UpstreamError) -> None:
        assert self._fast_state is not None
        route, token, lease = self._fast_state
        trace = self.trace
        if result is not Outcome.RELAYED:  # a 401 to retry or a failure: the general path
            resumed = self.run(resume=(route, token, lease, result))
            context = trace.context if trace is not None else None
            self.task = self.conn.loop.create_task(resumed, context=context)
            return
        upstream = self.upstream  # (_settle, inlined: the body was complete from the start)
        self.upstream = None
        if upstream is not None:
            route.upstream.release(upstream)
        if lease is not None:
            lease.end()
        self.done = True
        if trace is not None:
            finish(self)
        self.conn.finished(self)

    def abandon(self) -> None:
        """End the exchange at once: the client left, or broke its request off.

        Whatever it was doing, the upstream connection is dropped and the request ended
        on the lease now; a task is cancelled too (it then only hands the connection on,
        and its own clean-up finds nothing left to do).
        """
        self._stop()
        if self.task is not None:
            self.task.cancel()

    def _stop(self) -> None:
        """End the exchange: drop an upstream exchange left unfinished, end the request
        on the lease."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.detach()
            upstream.abort()
        lease = self._lease
        if lease is not None and lease.in_flight:
            lease.end()
        self.done = True
        if self.trace is not None:
            finish(self)

    async def run(self, resume: _Resume | None = None) -> None:
        """Serve the request; always ends by handing the connection its next request.

        Args:
            resume: Route, token, lease and upstream outcome of a fast-path attempt
                that did not end in a relayed response.
        """
        conn = self.conn
        try:
            if resume is None:
                prepared = await self._prepare()
                if prepared is None:
                    return
                route, token = prepared
                await self._relay(route, token, None)
            else:
                route, token, self._lease, result = resume
                await self._relay(route, token, result)
        except UpstreamError as exc:
            if self.responded:
                conn.abort()
            elif exc.timeout:
                answer_error(self, 504, "upstream_timeout", str(exc))
            else:
                answer_error(self, 502, "upstream_unavailable", str(exc))
        # (A name of its own: mypyc types a name by its first binding, UpstreamError above.)
        except Exception as failure:  # no token (or a bug): answer from the shared table
            if not isinstance(failure, TokenBrokerError):
                logger.error("proxy request failed error=%s", type(failure).__name__)
            status, code, message, retry_after = domain_error(failure)
            answer_error(self, status, code, message, retry_after=retry_after)
        finally:
            self._stop()
            self.body.clear()
            conn.finished(self)

    async def _prepare(self) -> tuple[Route, Token] | None:
        """Route, lease and token, and the whole body when it is to be kept for a resend."""
        route = admit(self)
        if route is None:
            return None
        conn = self.conn
        if route.pool is not None:
            lease = self._lease = await conn.lease(route)
            lease.begin()
            token = await lease.token()
        else:
            token = await conn.server.broker.aget_token(route.provider, route.scope)
        if self.expect_continue and not self.body_done:
            conn.write(_CONTINUE)
            conn.flush()
        if self.replayable and not self.body_done:
            self._body_waiter = self.conn.loop.create_future()
            await self._body_waiter
        return route, token

    async def _relay(
        self, route: Route, token: Token, result: Outcome | UpstreamError | None
    ) -> None:
        """Send until a response is relayed: once more after a swallowed 401, once more
        on a fresh connection when a reused one died before answering an idempotent request."""
        rejected = stale = False
        while True:
            if result is None:
                self.can_retry = self.replayable and not rejected
                upstream = await route.upstream.acquire(fresh=stale)
                result = await self._send(route, upstream, token)
            self._settle(route)
            if isinstance(result, UpstreamError):
                retry = result.replayable and self.idempotent and self.replayable
                if retry and not stale and not self.responded:
                    stale, result = True, None
                    continue
                raise result
            if result is Outcome.RELAYED:
                return
            rejected, result = True, None  # a 401 swallowed once: drop that token, resend
            conn = self.conn
            conn.server.count_rejected(route)
            if self.trace is not None:
                self.trace.retried = True
            lease = self._lease
            if lease is not None:
                lease.report_rejected(token.access_token)
                token = await lease.token()
            else:
                conn.server.broker.invalidate(route.provider, token.access_token, route.scope)
                token = await conn.server.broker.aget_token(route.provider, route.scope)

    async def _send(
        self, route: Route, upstream: UpstreamConnection, token: Token
    ) -> Outcome | UpstreamError:
        conn = self.conn
        self.upstream = upstream
        data = [self._head(route, token)]
        data.extend([chunk(piece) for piece in self.body] if self.chunked_in else self.body)
        if self.body_done and self.chunked_in:
            data.append(LAST_CHUNK)
        if not self.replayable:
            self.body.clear()
            self.streaming = True
            conn.resume_reading("buffer")
        waiter = self._waiter = conn.loop.create_future()
        upstream.start(
            self, data, conn.server.settings.upstream_timeout_seconds, sent=self.body_done
        )
        if conn.write_paused:
            upstream.pause_reading()
        result: Outcome | UpstreamError = await waiter
        return result

    def _settle(self, route: Route) -> None:
        """Return the upstream connection to its pool if it can carry another exchange."""
        upstream = self.upstream
        self.upstream = None
        self.streaming = False
        if upstream is None:
            return
        if self.body_done and upstream.reusable:
            route.upstream.release(upstream)
        else:
            upstream.detach()
            upstream.close()
        if not self.body_done:  # answered before the whole body came: don't reuse
            self.close_after = True

    def _head(self, route: Route, token: Token) -> bytes:
        path, sep, query = self.target.partition(b"?")
        lines = [
            self.method,
            b" ",
            route.target(path),
            sep,
            query,
            route.request_suffix,  # " HTTP/1.1\r\nhost: ...\r\n"
            *self.header_lines,
            authorization_line(token),
        ]
        if self.chunked_in:
            lines.append(b"transfer-encoding: chunked\r\n")
        elif self.content_length is not None:
            lines.append(b"content-length: %d\r\n" % self.content_length)
        lines.append(self.conn.forwarded)
        return b"".join(lines)

    # -- ResponseSink -------------------------------------------------------------------------

    def response_head(self, status: int, head: bytes) -> bool:
        """Relay the upstream's status and end-to-end headers (re-framed for the client).

        ``head`` is the upstream's head as received. The common case (HTTP/1.1 with a
        Content-Length and no hop-by-hop header but ``Connection: keep-alive``) is
        relayed as it is; otherwise hop-by-hop lines (and any the upstream's
        ``Connection`` names) are cut, the status line is the proxy's own
        (``HTTP/1.1``, for 1.0 clients too, as nginx and Envoy answer), and the framing
        is rebuilt for the client's version (never chunked toward HTTP/1.0).
        """
        low = head.lower()
        length = b"\ncontent-length:" in low
        chunked = b"\ntransfer-encoding:" in low
        self.framed = length or chunked
        if status == 401 and self.can_retry:
            return False
        self.status = status
        self.responded = True
        responses = self.conn.server.responses  # (count_status, inlined: per request)
        responses[status] = responses.get(status, 0) + 1
        if (
            length
            and not chunked
            and not self.close_after
            and self.version == b"1.1"
            and low.startswith(b"http/1.1 ")
        ):
            hop = HOP_LINE.search(low)
            if hop is None or (
                hop.group(1) == b"connection"
                and hop.group(2).strip() == b"keep-alive"
                and HOP_LINE.search(low, hop.end() - 1) is None
            ):
                self.conn.write(head)
                return True
        if (chunked or not length) and not self.head_only and status not in _NO_BODY_STATUS:
            if self.version == b"1.1":  # re-chunk what we relay piece by piece
                self._chunked_out = True
            else:
                self.close_after = True  # HTTP/1.0: the close delimits the body
        self.conn.write(
            reframed(head, status, self._chunked_out, self.close_after, self.version == b"1.0")
        )
        return True

    def response_body(self, data: bytes) -> None:
        """Relay a piece of the response body."""
        self.conn._out.append(chunk(data) if self._chunked_out else data)  # (write, inlined)

    def response_end(self, *, eof: bool) -> None:
        """The response is complete."""
        if self._chunked_out:
            self.conn.write(LAST_CHUNK)

    def flush(self) -> None:
        """Write out what one upstream read produced (if the completion has not already)."""
        if self.conn._out:
            self.conn.flush()

    def outcome(self, result: Outcome | UpstreamError) -> None:
        """The upstream exchange ended: wake :meth:`_send`, or finish the fast path."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(result)
        else:
            self._fast_done(result)

    def __repr__(self) -> str:
        return f"<ProxiedRequest {self.method.decode()} status={self.status}>"
