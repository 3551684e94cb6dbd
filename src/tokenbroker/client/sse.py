"""Reading a Server-Sent Events stream: a sans-I/O parser and a resuming httpx reader.

:class:`EventParser` implements the WHATWG HTML "Server-sent events" interpretation
(§9.2.6): lines end in CRLF, LF or CR (also split across chunks); a line starting with
``:`` is a comment; ``data:`` lines of one event are joined with LF; ``id:`` sets the last
event id (ignored when it holds NUL) and it carries over to later events; ``retry:``
with only ASCII digits sets the reconnection time; an event with no data is not
dispatched; a leading BOM is dropped.

:func:`read_events` follows a stream with an ``httpx.Client``: it yields each
:class:`ServerEvent`, and when the connection drops or the server ends the stream (a
maximum lifetime), it reconnects with ``Last-Event-ID`` so the server sends exactly what
is missing. It stops on ``204`` (the server's "nothing more, ever") or after a final
event. Reconnects that bring no new event are bounded and back off exponentially; the
server's ``retry:`` is the least wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import httpx

__all__ = ["FINAL_EVENTS", "EventParser", "ServerEvent", "read_events"]

#: Event names that end a job's stream (DESIGN §3.3).
FINAL_EVENTS = frozenset({"completed", "error", "canceled"})


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One dispatched event.

    Attributes:
        event: The event type (``message`` when the stream named none).
        data: The data lines joined with LF.
        id: The last event id when it was dispatched ("" when none was ever set).
    """

    event: str
    data: str
    id: str


class EventParser:
    """Turns the text of a stream into events, chunk by chunk (no I/O).

    Attributes:
        last_event_id: The last ``id:`` seen (what a reconnect sends as ``Last-Event-ID``).
        retry_ms: The last valid ``retry:`` value, or None.
    """

    def __init__(self) -> None:
        self.last_event_id = ""
        self.retry_ms: int | None = None
        self._buffer = ""
        self._started = False
        self._after_cr = False
        self._event = ""
        self._data: list[str] = []

    def __repr__(self) -> str:
        return f"EventParser(last_event_id={self.last_event_id!r}, retry_ms={self.retry_ms})"

    def feed(self, text: str) -> list[ServerEvent]:
        """Parse the next piece of the stream.

        Args:
            text: Decoded stream text, cut anywhere (even between CR and LF).

        Returns:
            The events completed by this piece, in order.
        """
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._after_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF cut between two chunks
        if text:
            self._after_cr = text.endswith("\r")
        self._buffer += text
        events: list[ServerEvent] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            end, width = cut
            line, self._buffer = self._buffer[:end], self._buffer[end + width :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> ServerEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self.last_event_id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> ServerEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return ServerEvent(event=event, data="\n".join(data), id=self.last_event_id)


def _line_end(buffer: str) -> tuple[int, int] | None:
    """Where the first line of ``buffer`` ends and the width of its terminator (CRLF, LF or
    CR), or None when no line is complete."""
    lf, cr = buffer.find("\n"), buffer.find("\r")
    if cr == -1:
        return None if lf == -1 else (lf, 1)
    if lf != -1 and lf < cr:
        return lf, 1
    return cr, 2 if buffer[cr + 1 : cr + 2] == "\n" else 1


def read_events(
    client: httpx.Client,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    last_event_id: str = "",
    final: Collection[str] = FINAL_EVENTS,
    max_retries: int = 5,
    backoff: float = 0.25,
    max_backoff: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[ServerEvent]:
    """Follow the event stream at ``url``, resuming after dropped connections.

    Args:
        client: The httpx client (its base URL, auth and timeouts apply; a read timeout
            longer than the server's heartbeat period).
        url: The stream's URL.
        headers: Extra request headers (e.g. ``Authorization``).
        last_event_id: Resume after this id ("" for the whole stream).
        final: Event names after which the stream is over.
        max_retries: Reconnects in a row that bring no new event before giving up.
        backoff: Seconds before the first such reconnect; doubled each time.
        max_backoff: The longest wait between reconnects.
        sleep: Waits between reconnects (tests pass a recorder).

    Yields:
        Every event, heartbeats included, in order.

    Raises:
        httpx.HTTPStatusError: The server answered neither 200 nor 204 (e.g. 401, 404).
        httpx.TransportError: The connection failed ``max_retries + 1`` times in a row.
        ValueError: A 200 that is not ``text/event-stream``.
    """
    parser = EventParser()
    parser.last_event_id = last_event_id
    failures = 0
    while True:
        sent = {**(headers or {}), "Accept": "text/event-stream", "Cache-Control": "no-store"}
        if parser.last_event_id:
            sent["Last-Event-ID"] = parser.last_event_id
        before = parser.last_event_id
        try:
            with client.stream("GET", url, headers=sent) as response:
                if response.status_code == 204:
                    return
                response.raise_for_status()
                kind = response.headers.get("content-type", "").split(";")[0].strip()
                if response.status_code != 200 or kind != "text/event-stream":
                    raise ValueError(f"not an event stream: {response.status_code} {kind!r}")
                for chunk in response.iter_text():
                    for event in parser.feed(chunk):
                        yield event
                        if event.event in final:
                            return
            error: httpx.TransportError | None = None
        except httpx.TransportError as exc:  # dropped mid-stream, refused, timed out
            error = exc
        # A new id means progress: the retry budget is for reconnects that bring nothing.
        failures = 0 if parser.last_event_id != before else failures + 1
        if failures > max_retries:
            if error is not None:
                raise error
            raise httpx.RemoteProtocolError(f"the stream ended {failures} times with no event")
        parser = _fresh(parser)
        least = (parser.retry_ms or 0) / 1000
        wait = backoff * 2 ** (failures - 1) if failures else 0.0
        sleep(min(max_backoff, max(least, wait)))


def _fresh(parser: EventParser) -> EventParser:
    """A parser for a new connection that keeps the last event id and retry time (WHATWG:
    a half-received event is dropped on reconnect)."""
    fresh = EventParser()
    fresh.last_event_id, fresh.retry_ms = parser.last_event_id, parser.retry_ms
    return fresh
