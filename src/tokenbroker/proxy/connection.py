"""One client TCP connection: parse requests with httptools, serve them in order.

A :class:`ClientConnection` is an ``asyncio.Protocol``, so it knows when its TCP
connection closes — which the per-connection token lease needs and ASGI servers
do not expose. Requests are answered strictly in order (pipelining): a request
parsed while another is being served waits, and reading pauses meanwhile. At most
:data:`MAX_PIPELINED` requests are parsed ahead of their answers: the bytes after them
(the rest of one read, at most) are held unparsed until the queue has room.
Leases taken for pool routes are kept for the connection's life and closed with it.

An idle connection (nothing parsed or in flight since its last answer) is closed after
``client_keepalive_seconds``, and a connection accepted beyond the proxy's
``max_connections`` gets 503 and is closed at once, so idle clients cannot use up the
process's file descriptors.

A client that breaks its request (bytes llhttp refuses, a head that does not finish
in time, a body that stalls) is refused in one place, :meth:`ClientConnection.refuse`:
nothing more is parsed, a request whose body broke off ends at once, and the
connection closes. Reading goes on (the bytes are dropped) so that a client hanging
up is always seen and the connection's resources are freed with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from .exchange import ProxiedRequest
from .http import (
    MAX_HEAD_BYTES,
    REPLACED_HEADERS,
    BadFramingError,
    BadVersionError,
    HeadTooLargeError,
    UnknownCodingError,
    connection_tokens,
    error_reply,
)
from .lease import LeaseState, PoolLease

if TYPE_CHECKING:
    from .host import ProxyHost
    from .routes import Route

__all__ = ["ClientConnection"]

logger = logging.getLogger("tokenbroker.proxy")

MAX_PIPELINED = 8
"""Requests parsed and not yet answered on one connection, the one being served included
(one more when a head's end is split between two reads)."""
_END = b"\r\n\r\n"  # every head ends so (llhttp refuses bare LFs): at most one head per piece
LINGER_SECONDS, LINGER_BYTES = 2.0, 1 << 20
"""How long, and how much, a refused connection still reads and drops of what its client sends
after the error reply before it closes (nginx's lingering close): closing a socket with unread
bytes makes the kernel send a reset, which can destroy the reply before the client read it."""
_BUSY = error_reply(
    503, "too_many_connections", "the proxy holds all the connections it can", close=True
)


class ClientConnection(asyncio.Protocol):
    """Serve one client connection.

    Args:
        server: The proxy this connection belongs to.
    """

    def __init__(self, server: ProxyHost) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.forwarded = b"\r\n"
        self._parser = httptools.HttpRequestParser(self)
        self._drop = REPLACED_HEADERS | server.key_header
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._raw_head = 0  # bytes read since the parser last handed over a head or body part
        self._body_left = 0  # Content-Length body bytes still to come (0 when unknown)
        self._backlog = b""  # bytes read but not parsed while MAX_PIPELINED requests wait
        self.head_since = math.inf  # when the head being read began to arrive
        self.request_since = math.inf  # when the request being read began (reading time only)
        self._paused_at = 0.0  # when reading last stopped
        self.send_since = 0.0  # when the client last took response bytes while writing waited
        self.unsent = 0  # bytes waiting for the client then
        self.idle_since = math.inf  # when the last answer went out with nothing after it
        self._refused = False  # a broken request: nothing more is parsed
        self._lingered = 0  # bytes dropped since the request was refused
        self._refusal: tuple[int, bytes] | None = None  # its status and error reply
        self._closing = False
        self.parsing: ProxiedRequest | None = None
        self.current: ProxiedRequest | None = None
        self._queue: deque[ProxiedRequest] = deque()
        self._out: list[bytes] = []
        self.pauses: set[str] = set()
        self.leases: dict[Route, PoolLease] = {}  # read by ProxiedRequest._fast too
        self.write_paused = False
        self.closed = False
        self.body_moved = 0.0
        self.last_path = b""  # the last path that passed the checks, and its route
        self.last_route: Route | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # Looked up once: asyncio.get_running_loop() costs a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        server = self.server
        if len(server.connections) >= server.max_connections:
            self._refused = True  # whatever it sends is dropped; it never enters the set
            self.write(_BUSY)
            server.count_status(503)
            self.close()  # at once, not lingering: its descriptor is what the cap protects
            return
        # The first head is timed from the accept.
        self.head_since = self.request_since = self.loop.time()
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
            self.forwarded = (
                b"x-forwarded-for: %b\r\nx-forwarded-proto: http\r\n\r\n" % str(peer[0]).encode()
            )
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # read and dropped: reading on is how a hang-up is seen
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES and self.transport is not None:
                if self._closing:  # an endless sender: close, or stop reading it until
                    self._end_linger()  # the answers before the refusal are out
                else:
                    self.transport.pause_reading()
            return
        if self._backlog:  # (reading is paused; a read already under way still lands)
            self._backlog += data
            return
        if self.parsing is None and self.head_since == math.inf:
            # The first bytes of a head (cleared when the head is complete). The rest of a
            # read that completes a request is not timed until more bytes come: such a
            # connection holds no more than one idle between requests does.
            self.head_since = self.request_since = self.loop.time()
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """Parse what was read: at once when it ends one request at most (or is all body),
        else head by head until :data:`MAX_PIPELINED` requests wait."""
        try:
            # Counting head ends is one C scan of a read (not of a body known to go on).
            if self._body_left >= len(data) or (not self._queue and data.count(_END) < 2):
                self._feed(data)
            else:
                self._feed_pipelined(data)
        except httptools.HttpParserUpgrade:
            # Upgrades are not relayed: the request (complete: llhttp ended it) is
            # answered, then the connection closes; what follows is another protocol.
            self._refused = True
            last = self._queue[-1] if self._queue else self.current
            if last is not None:
                last.close_after = True
            else:
                self.close()
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, HeadTooLargeError):
                self.refuse(431, "headers_too_large", "the request head is too large")
            elif isinstance(cause, BadVersionError):
                self.refuse(505, "version_not_supported", "only HTTP/1.0 and 1.1 are served")
            elif isinstance(cause, UnknownCodingError):
                self.refuse(501, "not_implemented", "only the chunked transfer coding is served")
            else:
                self.refuse(400, "bad_request", "malformed HTTP request")

    def _feed(self, data: bytes | memoryview) -> None:
        # Bytes that bring neither a complete head nor body data (a head, trailer fields,
        # chunk framing) are counted until the parser hands something over: llhttp keeps a
        # partial header value or target in memory, so counting complete headers alone
        # would leave one endless line unbounded.
        self._raw_head += len(data)
        self._parser.feed_data(data)
        if self.parsing is not None:  # a body is still coming: note when it last moved
            self.body_moved = self.loop.time()
        if self._raw_head > MAX_HEAD_BYTES:
            self.refuse(431, "headers_too_large", "the request head is too large")

    def _feed_pipelined(self, data: bytes) -> None:
        # llhttp cannot be stopped inside a buffer, so it gets one head's end at a time;
        # the rest waits as bytes, not as parsed requests (which take ~10x the memory).
        view = memoryview(data)
        at = 0
        size = len(data)
        while at < size and not self._refused:
            if len(self._queue) >= MAX_PIPELINED - 1:
                self._backlog = data[at:]
                self.pause_reading("pipeline")
                return
            end = data.find(_END, at)
            end = size if end < 0 else end + 4
            self._feed(view[at:end])
            at = end

    def eof_received(self) -> bool:
        # A client that stops sending has left, as nginx assumes: stop waiting for a
        # token or an upstream on its behalf and close (False closes the transport).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._backlog = b""
        queued, self._queue = self._queue, deque()
        current = self.current
        if current is not None and not current.done:
            current.abandon()
        for request in queued:
            request.close_after = True
        self._close_leases()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.send_since = self.loop.time()
            self.unsent = self.transport.get_write_buffer_size()
        current = self.current
        if current is not None and current.upstream is not None:
            current.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        current = self.current
        if current is not None and current.upstream is not None:
            current.upstream.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLargeError

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLargeError
        if self.parsing is None:
            self._headers.append((name, value))
        # else a trailer field of a chunked body (RFC 9112 §7.1.2): counted, dropped, never
        # forwarded and never a header of the next request

    def on_headers_complete(self) -> None:
        parser = self._parser
        content_length: int | None = None
        chunked = expect = False
        codings = b""  # every Transfer-Encoding field, joined
        key: str | None = None
        drop = self._drop
        lines: list[bytes] = []
        listed: set[bytes] | None = None
        for name, value in self._headers:  # one pass: take what we need, keep the rest
            lower = name.lower()
            if lower not in drop:
                lines.append(b"%b: %b\r\n" % (name, value))
            elif lower == b"content-length":
                content_length = self._body_left = int(value)
            elif lower == b"transfer-encoding":  # several fields are one list (RFC 9110 §5.3)
                codings = value if not codings else codings + b"," + value
            elif lower == b"expect":
                expect = value.lower() == b"100-continue"
            elif lower == b"connection":
                listed = (listed or set()) | connection_tokens(value)
            elif lower in self.server.key_header:
                key = value.decode("latin-1")
        if listed:  # rare: headers the client's Connection header names are hop-by-hop too
            listed -= REPLACED_HEADERS
            lines = [line for line in lines if line.split(b":", 1)[0].lower() not in listed]
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):  # llhttp also takes 0.9 and 2.0 lines
            raise BadVersionError
        if codings:
            # RFC 9112 §6.3: unless chunked is last the body length cannot be known; §6.1:
            # in HTTP/1.0 the framing is faulty (a 1.0 hop on the way may have ignored it).
            if version == "1.0" or codings.rpartition(b",")[2].strip().lower() != b"chunked":
                raise BadFramingError
            if codings.strip().lower() != b"chunked":  # a coding we cannot undo (nginx: 501)
                raise UnknownCodingError
            chunked = True
        request = ProxiedRequest(
            self,
            parser.get_method(),
            self._url,
            lines,
            b"1.1" if version == "1.1" else b"1.0",
            keep_alive=parser.should_keep_alive(),
            content_length=content_length,
            chunked=chunked,
            expect_continue=expect and version == "1.1",  # RFC 9110 §10.1.1
            key=key,
        )
        self._url = b""  # ready for the next request (no on_message_begin callback: cheaper)
        self._headers = []
        self._head_bytes = self._raw_head = 0
        self.head_since = math.inf
        if self.request_since == math.inf:  # its head came in the read that ended the last
            self.request_since = self.loop.time()
        self.parsing = request
        if self.current is None:
            self.current = request  # (_start, inlined: per request)
            request.begin()
        else:
            self._queue.append(request)
            self.pause_reading("pipeline")

    def on_body(self, body: bytes) -> None:
        self._raw_head = 0
        self._body_left -= len(body)
        if self.parsing is not None:
            self.parsing.request_body(body)

    def on_message_complete(self) -> None:
        request, self.parsing = self.parsing, None
        self._head_bytes = self._raw_head = self._body_left = 0  # (trailer fields were counted)
        self.request_since = math.inf
        if request is not None:
            request.request_end()

    # -- used by its requests and the proxy's tick -------------------------------------------

    async def lease(self, route: Route) -> PoolLease:
        """This connection's lease on ``route``'s pool, taken on first use and kept."""
        lease = self.leases.get(route)
        if lease is not None and lease.state is LeaseState.ACTIVE:
            return lease
        assert route.pool is not None
        lease = await route.pool.acquire(self.peer)
        if self.closed or self._closing:  # the client left while the grant was being delivered
            lease.close()
            raise asyncio.CancelledError
        self.leases[route] = lease
        return lease

    @property
    def queued(self) -> int:
        """Requests parsed and waiting behind the one being served."""
        return len(self._queue)

    def holds_expired_lease(self) -> bool:
        """True when a lease was reaped and no request is being served."""
        return self.current is None and any(
            lease.state is LeaseState.EXPIRED for lease in self.leases.values()
        )

    def refuse(self, status: int, code: str, message: str) -> None:
        """End a request the client broke, and then the connection: the one place for a
        request that cannot be parsed or did not arrive in time.

        Nothing more is parsed (bytes are still read, and dropped, so that a hang-up is
        seen). A request whose body broke off ends at once: its upstream connection is
        dropped and its request ended on the lease. Requests complete before the broken
        one are answered first. Then the error reply goes out (unless a response had
        begun: then the connection is dropped) and the connection closes, which closes
        its leases.
        """
        if self._refused or self._closing:
            return
        self._refused = True
        self.head_since = self.request_since = math.inf
        self._backlog = b""
        broken, self.parsing = self.parsing, None
        self._refusal = (status, error_reply(status, code, message, close=True))
        current = self.current
        if broken is not None and broken is not current:  # queued behind current: never begun
            self._queue.remove(broken)
        elif broken is not None:  # the request being served broke off
            self.current = None
            broken.abandon()
            if broken.responded:
                self.abort()
                return
            current = None
        if current is None:
            self._send_refusal()
        # else the refusal goes out in order, once the requests before it are answered

    def write(self, data: bytes) -> None:
        """Queue bytes for the client (sent by :meth:`flush`)."""
        self._out.append(data)

    def flush(self) -> None:
        """Send the queued bytes in one system call."""
        out = self._out
        if out:
            self._out = []
            if self.transport is not None and not self.closed and not self._closing:
                if len(out) == 1:
                    self.transport.write(out[0])
                else:
                    self.transport.writelines(out)

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client for ``reason`` (until :meth:`resume_reading`)."""
        if not self.pauses:
            self._paused_at = self.loop.time()
            if self.transport is not None and not self.closed:
                self.transport.pause_reading()
        self.pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        """Drop one reason to stop reading; read again when none is left."""
        if reason not in self.pauses:
            return
        self.pauses.discard(reason)
        if not self.pauses:
            self.request_since += self.loop.time() - self._paused_at  # not the client's time
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def finished(self, request: ProxiedRequest) -> None:
        """``request`` is over: start the next pipelined request, or close."""
        self.flush()
        if self.current is request:
            self.current = None
        if self.closed or self._closing:
            return
        self.idle_since = self.loop.time()  # (idle() looks at it only once nothing is left)
        if request.close_after:
            self.close()
            return
        if self._queue:
            self._start(self._queue.popleft())
        elif self._refusal is not None:
            self._send_refusal()
            return
        if self._backlog:  # room in the pipeline again: parse what was held back
            backlog, self._backlog = self._backlog, b""
            self._parse(backlog)
        if self.pauses and not self._queue and not self._backlog and not self._closing:
            self.resume_reading("pipeline")

    def close(self) -> None:
        """Close after sending what is queued."""
        self.flush()
        self._closing = True
        self._close_leases()  # now: a client that does not read may delay the close itself
        if self.transport is not None and not self.closed:
            self.transport.close()

    def linger(self) -> None:
        """Send what is queued, end the sending side, and close once the client hangs up
        or :data:`LINGER_SECONDS` pass; what it sends meanwhile is read and dropped."""
        self.flush()
        self._closing = True
        self._close_leases()
        transport = self.transport
        if transport is None or self.closed:
            return
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self._end_linger)
        else:
            transport.close()

    def _end_linger(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (a response failed after it had begun)."""
        self._out = []
        self._closing = True
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- internals -----------------------------------------------------------------------------

    def _start(self, request: ProxiedRequest) -> None:
        self.current = request
        request.begin()

    def _close_leases(self) -> None:
        for lease in self.leases.values():
            lease.close()
        self.leases.clear()

    def _send_refusal(self) -> None:
        assert self._refusal is not None
        status, reply = self._refusal
        self.write(reply)
        self.server.count_status(status)
        self.linger()

    def __repr__(self) -> str:
        return f"<ClientConnection peer={self.peer} leases={len(self.leases)}>"
