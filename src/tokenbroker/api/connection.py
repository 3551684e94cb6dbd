"""The API's HTTP/1.1 protocol for uvicorn: httptools with requests bounded while read.

uvicorn's :class:`~uvicorn.protocols.http.httptools_impl.HttpToolsProtocol` buffers a
request head until it is complete, however large, and only then hands it to the
application, so the middleware's header limit comes too late to bound memory.
:class:`BoundedHeadProtocol` counts the head as it arrives
(:class:`~tokenbroker.edge.heads.HeadBudget`) and answers ``431`` and closes as soon as it
passes :data:`~tokenbroker.edge.heads.MAX_HEAD_BYTES`.

uvicorn has no clock on a request that is still arriving either: a head and one byte of
a body, then silence (or one byte every few seconds), holds a connection and the
application's task for good. :class:`BoundedHeadProtocol` answers ``408`` and closes when
a body is silent for ``body_timeout`` seconds, or a whole request (head and body) takes
more than ``request_timeout`` seconds to arrive, counted from its first byte (from the
accept, for a connection's first request). Time the server spends not reading (reading
paused because the application has not taken the body yet, an earlier request still
being answered, ``Expect: 100-continue`` not yet answered) is never held against the
client. The clocks stop once the request has arrived: a slow answer is not a slow request.
``serve`` passes :meth:`BoundedHeadProtocol.bounded` as ``uvicorn.Config(http=...)``.

Each request's scope also carries the TCP peer's ``(host, port)`` under :data:`PEER`, which
uvicorn's proxy-headers middleware leaves alone (it rewrites ``client``).
"""

from __future__ import annotations

import asyncio
import json
import math
from http import HTTPStatus
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from ..edge.heads import HEADERS_TOO_LARGE, MAX_HEAD_BYTES, HeadBudget
from ..edge.statuses import REQUEST_TIMEOUT, ErrorStatus

__all__ = ["PEER", "BoundedHeadProtocol"]

#: The scope key of the TCP peer's ``(host, port)`` (None for a Unix socket).
PEER = "tokenbroker.peer"

_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: %d\r\n"
    b"cache-control: no-store\r\n"
    b"connection: close\r\n\r\n%b" % (len(HEADERS_TOO_LARGE), HEADERS_TOO_LARGE)
)


def _closing_answer(row: ErrorStatus) -> bytes:
    """A whole response for ``row`` (the house error body), closing the connection."""
    body = json.dumps({"error": {"code": row.code, "message": row.message}}).encode()
    return (
        b"HTTP/1.1 %d %b\r\n"
        b"content-type: application/json\r\n"
        b"content-length: %d\r\n"
        b"cache-control: no-store\r\n"
        b"connection: close\r\n\r\n%b"
        % (row.status, HTTPStatus(row.status).phrase.encode(), len(body), body)
    )


_TIMED_OUT = _closing_answer(REQUEST_TIMEOUT)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing request heads over ``max_head`` bytes with 431,
    and requests that do not arrive in time with 408.

    Args:
        config: The uvicorn configuration.
        server_state: uvicorn's shared server state.
        app_state: The application's lifespan state.
        _loop: The event loop (uvicorn's argument).
    """

    max_head = MAX_HEAD_BYTES
    #: Seconds a request body may stay silent (``server.client_body_timeout_seconds``).
    body_timeout = 10.0
    #: Seconds a whole request may take to arrive (``server.client_request_timeout_seconds``).
    request_timeout = 120.0

    @classmethod
    def bounded(cls, body_timeout: float, request_timeout: float) -> type[BoundedHeadProtocol]:
        """This protocol with other time bounds (uvicorn takes a class, not an instance).

        Args:
            body_timeout: Seconds a request body may stay silent before 408.
            request_timeout: Seconds a whole request may take to arrive before 408.

        Returns:
            A subclass with those bounds.
        """
        bounds = {"body_timeout": body_timeout, "request_timeout": request_timeout}
        return cast("type[BoundedHeadProtocol]", type(cls.__name__, (cls,), bounds))

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._budget = HeadBudget(self.max_head)
        self._refused = False
        # The request clocks, in loop time. A request is "arriving" from its first byte (the
        # accept, for the first) until its last; its body from the end of its head. A request
        # that arrives within one read (the fast token path) costs one loop.time() and arms
        # no timer; only the accept's clock arms one, once per connection.
        self._arriving = False
        self._in_body = False
        self._deadline = math.inf  # the whole request must have arrived by then
        self._body_since = math.inf  # the last read of body bytes (or the head's end)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arriving = True
        self._deadline = self.loop.time() + self.request_timeout
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # reading is paused; anything already read is dropped
            return
        super().data_received(data)
        if self._budget.fed(len(data)) and not self._refused:
            self._refuse()
        elif self._arriving and not self._refused:  # a request is still arriving after this read
            if self._in_body:
                self._body_since = self.loop.time()
            self._arm()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error here, ours (HeadTooLargeError) included.
        if self._budget.over:
            self._refuse()
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        self._budget.begin()
        if not self._arriving:  # (the first request's clock has run since the accept)
            self._arriving = True
            self._deadline = self.loop.time() + self.request_timeout
        super().on_message_begin()
        # The TCP peer, kept apart from "client", which uvicorn's proxy-headers middleware
        # rewrites from X-Forwarded-For: whether to believe a trusted front end's headers
        # depends on who is connected, not on who they say the client is.
        self.scope[PEER] = self.client  # type: ignore[literal-required]

    def on_url(self, url: bytes) -> None:
        self._budget.parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._budget.parsed(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._budget.headers_complete()
        self._in_body = True  # the read that ended the head starts the body's clock
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._budget.message_complete()
        self._arriving = self._in_body = False
        self._disarm()
        super().on_message_complete()

    def _refuse(self) -> None:
        """Stop reading; answer 431 and close (after the response in progress, if any)."""
        self._refused = True
        self.flow.pause_reading()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # uvicorn closes once that response is sent
            return
        if not self.transport.is_closing():
            self.transport.write(_TOO_LARGE)
            self.transport.close()

    def _due(self) -> float:
        """When the request in progress is late, unless more of it arrives."""
        if self._in_body:
            return min(self._deadline, self._body_since + self.body_timeout)
        return self._deadline

    def _arm(self) -> None:
        """Have :meth:`_expire` called by the time the request is due; a timer due sooner
        is kept (it re-arms), so a request costs at most one timer per phase."""
        due = self._due()
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = self.loop.call_at(due, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_due = math.inf

    def _waiting_on_us(self) -> bool:
        """The server is not reading the request, or has not asked for it yet: its silence is
        ours, not the client's."""
        if self.flow.read_paused or self.pipeline:
            return True
        cycle = self.cycle
        if cycle is None:
            return False
        if not self._in_body:  # ``cycle`` is the previous request's: still being answered?
            return not cycle.response_complete
        return cycle.waiting_for_100_continue

    def _expire(self) -> None:
        """The timer: answer 408 if the request is late, else arm for when it will be."""
        self._timer = None
        self._timer_due = math.inf
        if self._refused or not self._arriving or self.transport.is_closing():
            return
        if self.transport.get_protocol() is not self:  # upgraded: no longer an HTTP request
            return
        now = self.loop.time()
        if self._waiting_on_us():
            self._deadline = max(self._deadline, now + self.body_timeout)
            self._body_since = now
        elif now >= self._due():
            self._time_out()
            return
        self._arm()

    def _time_out(self) -> None:
        """Stop reading; answer 408 and close. If this request was answered already (without
        reading its body), just close; if its answer is going out, close after it."""
        self._refused = True
        self.flow.pause_reading()
        cycle = self.cycle
        if self._in_body and cycle is not None:  # this request's own cycle
            if cycle.response_started and not cycle.response_complete:
                cycle.keep_alive = False  # uvicorn closes once that response is sent
                return
            if not cycle.response_complete:
                # The application's receive() now returns http.disconnect and its send()
                # writes nothing: the 408 is the answer.
                cycle.disconnected = True
                cycle.message_event.set()
                self.transport.write(_TIMED_OUT)
        else:
            self.transport.write(_TIMED_OUT)
        self.transport.close()
