"""Run the token proxy on 127.0.0.1 in a background thread with its own event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TypeVar

import uvloop

from tokenbroker.testing.background import Background

from ..config import ProxySettings
from ..engine.broker import Broker
from ..proxy import ProxyServer
from ..proxy.pool import PoolStats

__all__ = ["ServedProxy"]

_T = TypeVar("_T")


class ServedProxy(Background):
    """A :class:`~tokenbroker.proxy.ProxyServer` serving until :meth:`stop`.

    Listens on ``settings.listen`` (use port 0) and always on a health port
    (``health_listen``, else any free loopback port). Pool accounts are logged in
    before :meth:`start` returns.

    Args:
        broker: The broker (not closed by :meth:`stop`).
        settings: The proxy settings.
        warm: Log in every pool account at start.
    """

    def __init__(self, broker: Broker, settings: ProxySettings, *, warm: bool = True) -> None:
        if settings.health_listen is None:
            settings = settings.model_copy(update={"health_listen": "127.0.0.1:0"})
        self.settings = settings
        self._broker = broker
        self._warm = warm
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: ProxyServer | None = None
        self.url = ""
        self.health_url = ""

    def start(self) -> ServedProxy:
        """Start listening (and log in the pools) and return self."""
        self._thread.start()
        self.server = self.call(self._start)
        self.url, self.health_url = self.server.url, self.server.health_url
        return self

    async def _start(self) -> ProxyServer:
        server = ProxyServer(self._broker, self.settings)
        await server.start()
        if self._warm:
            await server.warm()
        return server

    def call(self, function: Callable[[], Awaitable[_T]], timeout: float = 30.0) -> _T:
        """Run ``await function()`` on the proxy's loop and return its result."""

        async def run() -> _T:
            return await function()

        future: Future[_T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(timeout)

    def stats(self, prefix: str = "/") -> PoolStats:
        """The pool of the route with this prefix (thread-safe snapshot)."""
        assert self.server is not None
        for route, stats in self.server.pool_stats():
            if route.spec.prefix == prefix:
                return stats
        raise KeyError(f"no pool route with prefix {prefix!r}")

    def stop(self) -> None:
        """Close the proxy and stop its loop."""
        server = self.server
        if server is not None:
            self.call(server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __repr__(self) -> str:
        return f"ServedProxy(url={self.url!r})"
