"""Serve an ASGI application on 127.0.0.1 in a background thread (uvicorn), for tests and demos."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Literal

import uvicorn

from tokenbroker.testing.background import Background

__all__ = ["ServedApp"]


class ServedApp(Background):
    """An ASGI app served by uvicorn on a loopback port until :meth:`stop`.

    Args:
        app: The ASGI application.
        port: The port (0: any free one).
        host: The address to listen on.
        lifespan: ``"on"`` runs the app's ASGI lifespan (the broker's API uses it to follow
            stored consumers), ``"off"`` does not.
        http: uvicorn's HTTP protocol: a name (``"auto"``) or a class, e.g.
            :class:`~tokenbroker.api.connection.BoundedHeadProtocol` as ``serve`` uses.
    """

    def __init__(
        self,
        app: Any,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        lifespan: Literal["on", "off"] = "off",
        http: type[asyncio.Protocol] | str = "auto",
    ) -> None:
        self.app = app
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan=lifespan, http=http
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.url = ""

    def __repr__(self) -> str:
        return f"ServedApp(url={self.url!r})"

    def start(self) -> ServedApp:
        """Start serving and wait until the socket listens.

        Raises:
            RuntimeError: When the server did not start within 10 seconds.
        """
        self._thread.start()
        started = threading.Event()
        for _ in range(1000):
            if self._server.started or not self._thread.is_alive():
                break
            started.wait(0.01)
        if not self._server.started:
            raise RuntimeError("the ASGI server did not start")
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(10)
