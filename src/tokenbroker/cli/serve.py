"""``tokenbroker serve`` and ``tokenbroker proxy``: the HTTP API and the token proxy on uvloop.

``serve`` runs the HTTP API on uvicorn (httptools, with request heads bounded while
they are read, and requests in the time they take to arrive:
:mod:`~tokenbroker.api.connection`), and the proxy too when the config has a ``proxy:``
section; ``proxy`` runs the proxy alone. Both share one
event loop and one broker, whose tokens a ticker keeps warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn
import uvloop

from ..api.app import create_app
from ..api.connection import BoundedHeadProtocol
from ..config import ProxySettings, config_warnings
from ..edge.descriptors import budget
from ..engine.broker import Broker
from ..errors import ConfigError, ConfigProblem
from ..proxy import ProxyServer, compiled
from ..telemetry.logs import configure

__all__ = ["run_proxy", "serve"]

logger = logging.getLogger("tokenbroker.server")

Progress = Callable[[int, int], None]
Announce = Callable[[str], None]


def _keep_warm(broker: Broker, stop: threading.Event, every: float = 1.0) -> None:
    """Start refresh-ahead for idle tokens, so no consumer ever waits once warm (and retry
    required providers that could not be fetched yet)."""
    while not stop.wait(every):
        try:
            broker.refresh_due()
        except Exception:
            logger.exception("keep-warm tick failed")


def _fetch_required(broker: Broker) -> None:
    """Start fetching the ``required: true`` providers' tokens now, in the background: a
    failure does not stop the process, ``/readyz`` stays 503 until they arrive, and the
    keep-warm tick retries them."""
    started = broker.refresh_due()
    if started:
        logger.info("fetching %d required provider token(s)", started)


def _configure_logs(broker: Broker, config_path: Path) -> None:
    telemetry = broker.settings.telemetry
    configure(telemetry.log_level, telemetry.log_format)
    for warning in config_warnings(broker.settings, config_path):
        logger.warning("config %s", warning)


async def _start_proxy(
    broker: Broker, settings: ProxySettings, progress: Progress | None, announce: Announce
) -> ProxyServer:
    proxy = ProxyServer(broker, settings)
    failures = await proxy.warm(progress)
    for name, exc in failures.items():
        logger.warning("pool login failed account=%s error=%s", name, type(exc).__name__)
    await proxy.start()
    # Start-up objects (modules, settings, the pool) live for good: keep them out of
    # the collector's scans so a full collection cannot stall requests (a p99 matter).
    gc.collect()
    gc.freeze()
    # Requests make short-lived objects that reference counting frees; collect the
    # young generation less often (the default, every 700 allocations, costs ~2%).
    gc.set_threshold(50_000, 20, 100)
    logger.info("proxy request path %s", "compiled (mypyc)" if compiled() else "pure Python")
    announce(f"proxy listening on {proxy.url}")
    if proxy.health_url:
        announce(f"health listening on {proxy.health_url}")
    return proxy


class _AnnouncingServer(uvicorn.Server):
    """uvicorn's server, announcing each address it listens on once it does."""

    def __init__(self, config: uvicorn.Config, announce: Announce) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in self.servers if self.started else ():
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                self._announce(f"API listening on http://{shown}:{port}")


def serve(
    config_path: Path,
    listen: str | None = None,
    *,
    progress: Progress | None = None,
    announce: Announce = print,
) -> None:
    """Run the broker's HTTP API (and the proxy, if configured) until interrupted.

    Args:
        config_path: The YAML configuration.
        listen: ``host:port``; default ``server.listen`` from the config, else 127.0.0.1:8750.
        progress: Called as ``progress(done, total)`` while pool accounts log in.
        announce: Receives one line per listener once it listens.
    """
    broker = Broker.from_config(config_path)
    _configure_logs(broker, config_path)
    address = listen or broker.settings.server.listen
    host, _, port = address.rpartition(":")
    # X-Forwarded-For names the client only when the peer is a configured proxy; uvicorn
    # would otherwise believe it from any loopback peer.
    trusted = list(broker.settings.server.trusted_proxies)
    # Bounded by the descriptor budget too, so a flood on the API cannot take the
    # descriptors the proxy and the probes need (nor the proxy's take the API's).
    limit = broker.settings.server.max_connections
    if limit is None:
        limit = budget(with_proxy=broker.settings.proxy is not None).api_connections
    server = broker.settings.server
    protocol = BoundedHeadProtocol.bounded(
        server.client_body_timeout_seconds, server.client_request_timeout_seconds
    )
    config = uvicorn.Config(
        create_app(broker),
        host=host.strip("[]") or "127.0.0.1",
        port=int(port),
        loop="none",
        http=protocol,
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted,
        limit_concurrency=limit,
    )

    async def main() -> None:
        # uvicorn re-raises the signal that stopped it once it has shut down; with this
        # as the handler it restores, that only ends the loop, and the proxy and the
        # broker still close cleanly.
        serving = False

        def on_signal(signum: int, frame: object) -> None:
            if not serving:  # still logging in the pool: stop right away
                raise KeyboardInterrupt

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)
        proxy = None
        if broker.settings.proxy is not None:
            proxy = await _start_proxy(broker, broker.settings.proxy, progress, announce)
        try:
            serving = True
            await _AnnouncingServer(config, announce).serve()
        finally:
            if proxy is not None:
                await proxy.close()

    _fetch_required(broker)
    stop = threading.Event()
    if broker.settings.proxy is None:  # (the proxy's own tick keeps tokens warm otherwise)
        threading.Thread(target=_keep_warm, args=(broker, stop), daemon=True).start()
    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        logger.info("stopped before serving")
    finally:
        stop.set()
        broker.close()


def run_proxy(
    config_path: Path,
    listen: str | None = None,
    *,
    progress: Progress | None = None,
    announce: Announce = print,
) -> None:
    """Run the token proxy alone until SIGINT or SIGTERM.

    Args:
        config_path: The YAML configuration; it needs a ``proxy:`` section.
        listen: ``host:port`` instead of ``proxy.listen``.
        progress: Called as ``progress(done, total)`` while pool accounts log in.
        announce: Receives one line per listener once it listens.

    Raises:
        ConfigError: The configuration has no ``proxy:`` section.
    """
    broker = Broker.from_config(config_path)
    settings = broker.settings.proxy
    if settings is None:
        broker.close()
        raise ConfigError([ConfigProblem("proxy", "is required to run the proxy")])
    if listen:
        settings = settings.model_copy(update={"listen": listen})
    _configure_logs(broker, config_path)
    _fetch_required(broker)

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        starting = asyncio.ensure_future(_start_proxy(broker, settings, progress, announce))
        signalled = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while logging in the pool
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        proxy = starting.result()
        try:
            await signalled
        finally:
            await proxy.close()

    try:
        uvloop.run(main())
    finally:
        broker.close()
