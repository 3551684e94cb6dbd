"""The client-side timeouts of the proxy, enforced by its maintenance tick.

Each is nginx's (named in brackets) and read on :class:`ClientConnection` state once a
tick, never by a timer per request. A connection over one of them is dropped:

* ``client_send_timeout_seconds`` [``send_timeout``]: the client took no response bytes
  while writing waited for it — the connection is aborted (its request ends and its
  leases are freed as the connection is lost, in the same loop pass);
* ``client_body_timeout_seconds`` [``client_body_timeout``]: a request body stopped
  arriving — 408 if nothing was answered, then close;
* ``client_header_timeout_seconds`` [``client_header_timeout``]: a request head did not
  finish arriving — 408;
* ``client_request_timeout_seconds``: a whole request (head and body) took too long to
  arrive, however it trickled — 408;
* ``client_keepalive_seconds`` [``keepalive_timeout``]: nothing arrived or was in flight
  since the last answer — closed.

Time is the event loop's (``loop.time()``), the clock the connection stamps its state with.
"""

from __future__ import annotations

import math

from ..config import ProxySettings
from .connection import ClientConnection

__all__ = ["ClientTimeouts"]


class ClientTimeouts:
    """Apply the ``client_*`` timeouts of ``settings`` to client connections.

    Args:
        settings: The ``proxy:`` section.
    """

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings

    def enforce(self, connection: ClientConnection, now: float) -> None:
        """Drop ``connection`` if it is over one of its timeouts at loop time ``now``
        (the first found, in the order of the module docstring)."""
        settings = self.settings
        if send_stalled(connection, now, settings.client_send_timeout_seconds):
            connection.abort()
        elif body_stalled(connection, now, settings.client_body_timeout_seconds):
            connection.refuse(408, "request_timeout", "the request body stalled")
        elif head_stalled(connection, now, settings.client_header_timeout_seconds):
            connection.refuse(408, "request_timeout", "the request head took too long")
        elif request_overdue(connection, now, settings.client_request_timeout_seconds):
            connection.refuse(408, "request_timeout", "the request took too long to arrive")
        elif idle(connection, now, settings.client_keepalive_seconds):
            connection.close()

    def __repr__(self) -> str:
        return "<ClientTimeouts>"


def send_stalled(connection: ClientConnection, now: float, limit: float) -> bool:
    """The client has taken no response bytes for ``limit`` seconds while writing waits
    for it (nginx's ``send_timeout``: between two successful writes, not the whole
    response). Progress is read from the write buffer, once per check."""
    if not connection.write_paused or connection.transport is None or connection.closed:
        return False
    unsent = connection.transport.get_write_buffer_size()
    if unsent < connection.unsent:
        connection.send_since = now
    connection.unsent = unsent
    return now - connection.send_since > limit


def body_stalled(connection: ClientConnection, now: float, limit: float) -> bool:
    """A request body stopped arriving for ``limit`` seconds while we were reading."""
    return (
        connection.parsing is not None
        and not connection.pauses
        and connection.parsing.content_length != 0
        and now - connection.body_moved > limit
    )


def head_stalled(connection: ClientConnection, now: float, limit: float) -> bool:
    """A request head has been arriving for ``limit`` seconds and is not complete
    (while nothing is being served: the client may wait for a response first)."""
    return connection.current is None and now - connection.head_since > limit


def request_overdue(connection: ClientConnection, now: float, limit: float) -> bool:
    """The request being read (head and body) has been arriving for ``limit`` seconds
    of reading time, however it trickles; time spent not reading (paused for the
    upstream, a pipelined request or a lease) is not the client's and is not counted."""
    return (
        not connection.pauses
        and connection.current is connection.parsing
        and now - connection.request_since > limit
    )


def idle(connection: ClientConnection, now: float, limit: float) -> bool:
    """Nothing has arrived or been in flight for ``limit`` seconds since the last
    answer (a kept-alive connection between requests: nginx's ``keepalive_timeout``)."""
    return (
        connection.current is None
        and connection.parsing is None
        and connection.head_since == math.inf
        and now - connection.idle_since > limit
    )
