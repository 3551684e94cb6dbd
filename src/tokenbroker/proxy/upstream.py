"""Connections to an upstream: an ``asyncio.Protocol`` per connection, kept alive in a pool.

An :class:`UpstreamConnection` carries one exchange at a time. It parses the
response with httptools and hands status, headers and body pieces to the
exchange's :class:`ResponseSink` as they arrive, so bodies stream through without
being buffered; when the client cannot keep up, the exchange pauses this
connection's reading (TCP backpressure reaches the upstream).
"""

from __future__ import annotations

import asyncio
import enum
import math
import ssl
from collections.abc import Callable
from typing import Protocol, cast

import httptools

__all__ = ["Outcome", "ResponseSink", "UpstreamConnection", "UpstreamError", "UpstreamPool"]


class UpstreamError(Exception):
    """The upstream failed this exchange.

    Attributes:
        timeout: It did not answer in time (504), rather than failing (502).
        replayable: Nothing of a response arrived on a reused connection, so the
            request may be sent again on a fresh one (the keep-alive race).
    """

    def __init__(self, message: str, *, timeout: bool = False, replayable: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.replayable = replayable


class Outcome(enum.Enum):
    """How an exchange on an upstream connection ended."""

    RELAYED = "relayed"
    REJECTED = "rejected"  # a 401 the sink chose not to relay (to retry with a new token)


class ResponseSink(Protocol):
    """The receiving end of a response (the client side of an exchange)."""

    head_only: bool
    framed: bool  # set by response_head: the response has Content-Length or chunking

    def response_head(self, status: int, head: bytes) -> bool:
        """The response head arrived (status line to blank line, as received, checked by
        llhttp); return False to swallow this response (then retry)."""

    def response_body(self, data: bytes) -> None:
        """A body piece arrived."""

    def response_end(self, *, eof: bool) -> None:
        """The response is complete (``eof``: it was delimited by the connection closing)."""

    def flush(self) -> None:
        """Write out what the callbacks of one read produced."""

    def outcome(self, result: Outcome | UpstreamError) -> None:
        """The exchange on the upstream connection ended (called once, last)."""


class UpstreamConnection(asyncio.Protocol):
    """One TCP (or TLS) connection to an upstream, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._sink: ResponseSink | None = None
        self._raw = b""  # the response head's bytes as they arrive (no per-header callbacks)
        self._in_head = True
        self._informational = False
        self._swallow = False
        self._framed = True
        self._received = False
        # Inactivity timeout: armed once the whole request is sent, pushed back by every
        # response read, suspended while the client is too slow to take the response.
        self.deadline = math.inf
        self._timeout = 30.0
        self._loop = asyncio.get_running_loop()  # once: each lookup costs a getpid()
        self._paused_deadline = math.inf
        self._write_paused = False
        self._drained: list[Callable[[], None]] = []
        self.reusable = True
        self.closed = False
        self.used = 0
        self.idle_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:  # bytes while idle: the connection is out of step; drop it
            self.close()
            return
        self._received = True
        if self._in_head:
            self._raw = self._raw + data if self._raw else data
        if self.deadline != math.inf:
            self.deadline = self._loop.time() + self._timeout
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(UpstreamError("the upstream sent a malformed response"))
        sink.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self._pool.forget(self)
        sink = self._sink
        if sink is None:
            return
        if not self._in_head and not self._framed:  # a close-delimited body ends here
            self._finish(Outcome.REJECTED if self._swallow else Outcome.RELAYED, eof=True)
            sink.flush()
            return
        self._fail(
            UpstreamError(
                "the upstream closed the connection",
                replayable=not self._received and self.used > 1,
            )
        )

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        callbacks, self._drained = self._drained, []
        for callback in callbacks:
            callback()

    # -- httptools callbacks ---------------------------------------------------------------

    # No on_header: llhttp validates the head and the relay slices it from the raw bytes,
    # which costs far less than a Python call per header.

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        raw = self._raw
        end = raw.find(b"\r\n\r\n")
        if end < 0:  # llhttp accepted a head we cannot slice (bare LF line ends)
            raise UpstreamError("the upstream sent a malformed response head")
        if status < 200:  # 100 Continue, 103 Early Hints: not for the client
            self._informational = True
            self._raw = raw[end + 4 :]
            return
        head = raw[: end + 4]
        self._raw = b""
        self._in_head = False
        self.reusable = self.reusable and self._parser.should_keep_alive()
        sink = self._sink
        assert sink is not None
        self._swallow = not sink.response_head(status, head)
        self._framed = sink.head_only or status in (204, 304) or sink.framed
        if sink.head_only:
            # llhttp cannot know the request was HEAD and would wait for the body
            # that Content-Length announces: end here and parse afresh.
            self._parser = httptools.HttpResponseParser(self)
            self._finish(Outcome.REJECTED if self._swallow else Outcome.RELAYED)

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None and not self._swallow:
            sink.response_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._sink is not None:
            self._finish(Outcome.REJECTED if self._swallow else Outcome.RELAYED)

    # -- driven by the exchange ------------------------------------------------------------

    def start(self, sink: ResponseSink, data: list[bytes], timeout: float, *, sent: bool) -> None:
        """Send a request head (and any body bytes); ``sink.outcome`` hears how it ended.

        ``sent``: the whole request is in ``data`` (else call :meth:`sent` when it is).
        """
        assert self.transport is not None
        self._sink = sink
        self._raw = b""
        self._in_head = True
        self._swallow = False
        self._framed = True
        self._received = False
        self.used += 1
        self._timeout = timeout
        self.deadline = self._loop.time() + timeout if sent else math.inf
        self._pool._waiting.add(self)  # carrying an exchange: the pool's expire() checks it
        if len(data) == 1:
            self.transport.write(data[0])
        else:
            self.transport.writelines(data)

    def send(self, data: bytes) -> None:
        """Send more request body bytes."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    @property
    def write_paused(self) -> bool:
        """The upstream is not reading our request bytes fast enough."""
        return self._write_paused

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the upstream has taken the bytes written so far."""
        if self._write_paused:
            self._drained.append(callback)
        else:
            callback()

    def sent(self) -> None:
        """The whole request is sent: from now on the upstream must keep answering."""
        self.deadline = self._time() + self._timeout

    def pause_reading(self) -> None:
        """Stop reading the response (the client is slow; that is not the upstream's fault)."""
        self._paused_deadline = self.deadline
        self.deadline = math.inf
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the response again."""
        if self._paused_deadline != math.inf:
            self.deadline = self._time() + self._timeout
        self._paused_deadline = math.inf
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _time(self) -> float:
        return self._loop.time()

    def detach(self) -> None:
        """The exchange is over; drop references to it."""
        self._sink = None
        self._drained = []
        self.deadline = math.inf
        self._pool._waiting.discard(self)  # (unwatch, inlined: per request)

    def close(self) -> None:
        """Close the connection (it will not be reused)."""
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        """Drop the connection at once (the exchange was abandoned mid-way)."""
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    # -- internals -------------------------------------------------------------------------

    def _finish(self, outcome: Outcome, *, eof: bool = False) -> None:
        sink = self._sink
        if sink is None:
            return
        self._sink = None
        self.deadline = math.inf
        self._pool._waiting.discard(self)
        if outcome is Outcome.RELAYED:
            sink.response_end(eof=eof)
        sink.outcome(outcome)

    def _fail(self, error: UpstreamError) -> None:
        self.reusable = False
        sink = self._sink
        self._sink = None
        self._pool.unwatch(self)
        if not self.closed:
            self.abort()
        if sink is not None:
            sink.outcome(error)

    def timed_out(self) -> None:
        """No response head came in time: fail the exchange (504) and drop the connection."""
        self._fail(UpstreamError("the upstream did not answer in time", timeout=True))

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self._pool.host}:{self._pool.port} used={self.used}>"


class UpstreamPool:
    """Idle keep-alive connections to one upstream, reused most-recent first.

    Args:
        host: Upstream host.
        port: Upstream port.
        tls: Use TLS (verified against the system's CAs).
        keepalive: Idle connections kept at most.
        idle_seconds: An idle connection older than this is closed by :meth:`sweep`
            (keep it below the upstream's own keep-alive timeout).
        connect_timeout: Seconds to establish a connection.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        keepalive: int = 64,
        idle_seconds: float = 4.0,
        connect_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl.create_default_context() if tls else None
        self._keepalive = keepalive
        self._idle_seconds = idle_seconds
        self._connect_timeout = connect_timeout
        self._idle: list[UpstreamConnection] = []
        self._waiting: set[UpstreamConnection] = set()
        self.opened = 0

    async def acquire(self, *, fresh: bool = False) -> UpstreamConnection:
        """An idle connection, or a new one (``fresh``: always a new one).

        Raises:
            UpstreamError: The connection could not be made.
        """
        if not fresh:
            connection = self.take_idle()
            if connection is not None:
                return connection
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise UpstreamError("connecting to the upstream timed out", timeout=True) from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to the upstream ({exc.strerror})") from None
        self.opened += 1
        return protocol

    def take_idle(self) -> UpstreamConnection | None:
        """An idle connection without waiting, or None."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    def release(self, connection: UpstreamConnection) -> None:
        """Take back a connection whose exchange is complete; keep it if it can be reused."""
        if connection._sink is not None or connection._drained:  # else _finish detached it
            connection.detach()
        if connection.reusable and not connection.closed and len(self._idle) < self._keepalive:
            connection.idle_since = connection._loop.time()
            self._idle.append(connection)
        else:
            connection.close()

    def unwatch(self, connection: UpstreamConnection) -> None:
        """``connection``'s exchange ended."""
        self._waiting.discard(connection)

    def expire(self, now: float) -> int:
        """Fail exchanges whose upstream went quiet past their deadline (checked by a
        ticker: no timer per request). Returns how many."""
        late = [c for c in self._waiting if c.deadline <= now]
        for connection in late:
            self._waiting.discard(connection)
            connection.timed_out()
        return len(late)

    def forget(self, connection: UpstreamConnection) -> None:
        """A connection closed; drop it from the idle list."""
        self._waiting.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    def sweep(self) -> int:
        """Close connections idle longer than ``idle_seconds``; return how many."""
        cutoff = asyncio.get_running_loop().time() - self._idle_seconds
        old = [c for c in self._idle if c.idle_since < cutoff]
        for connection in old:
            connection.close()
            self.forget(connection)
        return len(old)

    def close(self) -> None:
        """Close every idle connection."""
        for connection in list(self._idle):
            connection.close()
        self._idle.clear()

    @property
    def idle(self) -> int:
        """Idle connections kept now."""
        return len(self._idle)

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.host}:{self.port} idle={len(self._idle)} opened={self.opened}>"
