"""The API's HTTP/1.1 protocol for uvicorn: httptools with request heads bounded while read.

uvicorn's :class:`~uvicorn.protocols.http.httptools_impl.HttpToolsProtocol` buffers a
request head until it is complete, however large, and only then hands it to the
application, so the middleware's header limit comes too late to bound memory.
:class:`BoundedHeadProtocol` counts the head as it arrives (:class:`~tokenbroker.heads.HeadBudget`)
and answers ``431`` and closes as soon as it passes :data:`~tokenbroker.heads.MAX_HEAD_BYTES`.
``serve`` passes the class as ``uvicorn.Config(http=...)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from .heads import HEADERS_TOO_LARGE, MAX_HEAD_BYTES, HeadBudget

__all__ = ["BoundedHeadProtocol"]

_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: %d\r\n"
    b"cache-control: no-store\r\n"
    b"connection: close\r\n\r\n%b" % (len(HEADERS_TOO_LARGE), HEADERS_TOO_LARGE)
)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing request heads over ``max_head`` bytes with 431.

    Args:
        config: The uvicorn configuration.
        server_state: uvicorn's shared server state.
        app_state: The application's lifespan state.
        _loop: The event loop (uvicorn's argument).
    """

    max_head = MAX_HEAD_BYTES

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

    def data_received(self, data: bytes) -> None:
        if self._refused:  # reading is paused; anything already read is dropped
            return
        super().data_received(data)
        if self._budget.fed(len(data)) and not self._refused:
            self._refuse()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error here, ours (HeadTooLargeError) included.
        if self._budget.over:
            self._refuse()
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        self._budget.begin()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._budget.parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._budget.parsed(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._budget.headers_complete()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._budget.message_complete()
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
