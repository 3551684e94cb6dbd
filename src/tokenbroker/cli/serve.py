"""``tokenbroker serve`` and ``tokenbroker proxy``: the HTTP API and the token proxy on uvloop.

``serve`` runs the HTTP API on uvicorn (httptools, with request heads bounded while
they are read, and requests in the time they take to arrive:
:mod:`~tokenbroker.api.connection`), and the proxy too when the config has a ``proxy:``
section; ``proxy`` runs the proxy alone. Both run on one start-up skeleton (:func:`_run`):
logs configured, required providers fetched, one event loop and one broker whose tokens a
ticker keeps warm, pools logged in, listeners announced, and one way to stop — SIGINT or
SIGTERM ends the process gracefully with status 0, even while a pool is still logging in.

``serve`` also runs the instance's job loop (:class:`~tokenbroker.jobs.service.JobService`:
runner, reaper, scheduler) on the same event loop, beside the API that starts and follows
jobs, with the job log lines (:func:`~tokenbroker.telemetry.logs.log_job_event`)
subscribed. At start-up the reaper ends or resumes jobs a crashed instance left running;
on SIGTERM the loop stops with the API, and jobs still running are left to their leases
(the next instance on the store resumes or ends them).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import click
import uvicorn
import uvloop

from ..api.app import create_app
from ..api.connection import BoundedHeadProtocol
from ..api.sse import draining
from ..config import ProxySettings, config_warnings
from ..core.tracing import Tracer, install
from ..edge.descriptors import budget
from ..engine.broker import Broker
from ..errors import ConfigError, ConfigProblem
from ..jobs.service import JobService
from ..proxy import ProxyServer, compiled
from ..telemetry.logs import configure, log_job_event
from .command import LOG_FILTER

__all__ = ["run_proxy", "serve"]

logger = logging.getLogger("tokenbroker.server")

Progress = Callable[[int, int], None]
Announce = Callable[[str], None]
T = TypeVar("T")


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


def _start_tracing(broker: Broker) -> Tracer | None:
    """Export traces when an OTLP endpoint is configured; None (nothing imported) if not.

    Raises:
        ConfigError: An endpoint is set but the ``otel`` extra is not installed.
    """
    telemetry = broker.settings.telemetry
    if telemetry.endpoint(os.environ) is None:
        return None
    try:
        from ..telemetry import tracing  # noqa: PLC0415 - OpenTelemetry only when tracing
    except ImportError as exc:
        needs = "needs the otel extra: pip install 'tokenbroker[otel]'"
        raise ConfigError([ConfigProblem("telemetry.otlp_endpoint", needs)]) from exc
    tracer = tracing.configure(telemetry, os.environ)
    logger.info("tracing on: OTLP export, sample ratio %s", telemetry.sample_ratio or "default")
    return tracer


def _configure_logs(broker: Broker, config_path: Path) -> None:
    telemetry = broker.settings.telemetry
    # --log-filter / TOKENBROKER_LOG_FILTER, when given, replaces the config's filter.
    ctx = click.get_current_context(silent=True)
    given = ctx.meta.get(LOG_FILTER) if ctx is not None else None
    configure(telemetry.log_level, telemetry.log_format, given or telemetry.log_filter)
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
    """uvicorn's server, announcing each address it listens on once it does, and leaving the
    signals to :class:`_Shutdown` (uvicorn would otherwise take SIGINT and SIGTERM for itself
    and raise them again once it has stopped)."""

    def __init__(self, config: uvicorn.Config, announce: Announce) -> None:
        super().__init__(config)
        self._announce = announce

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in self.servers if self.started else ():
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                self._announce(f"API listening on http://{shown}:{port}")


def _api_config(broker: Broker, address: str, jobs: JobService | None = None) -> uvicorn.Config:
    """uvicorn's configuration for the broker's HTTP API on ``address`` (``host:port``)."""
    host, _, port = address.rpartition(":")
    server = broker.settings.server
    # X-Forwarded-For names the client only when the peer is a configured proxy; uvicorn
    # would otherwise believe it from any loopback peer.
    trusted = list(server.trusted_proxies)
    # Bounded by the descriptor budget too, so a flood on the API cannot take the
    # descriptors the proxy and the probes need (nor the proxy's take the API's).
    limit = server.max_connections
    if limit is None:
        limit = budget(with_proxy=broker.settings.proxy is not None).api_connections
    protocol = BoundedHeadProtocol.bounded(
        server.client_body_timeout_seconds, server.client_request_timeout_seconds
    )
    return uvicorn.Config(
        create_app(broker, job_service=jobs),
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


def _show_pools(api: uvicorn.Config, proxy: ProxyServer) -> None:
    """Let the status page (``/ui``) read the pools of the proxy running in this process."""
    view = getattr(getattr(api.app, "state", None), "status", None)
    if view is not None:
        view.pools = proxy


class _Shutdown:
    """The one way both commands stop: SIGINT or SIGTERM, caught on the event loop.

    The first signal asks for a graceful stop (:attr:`requested`): a pool still logging in
    is abandoned at once, listeners close and open API requests may finish. A second
    SIGINT (Ctrl-C again) sets :attr:`forced` too: the API stops waiting for them.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.forced = asyncio.Event()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Catch the signals on ``loop`` until :meth:`remove`."""
        for signum in self.SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the signals back to their default handling."""
        for signum in self.SIGNALS:
            loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        if self.requested.is_set() and signum == signal.SIGINT:
            self.forced.set()
        self.requested.set()

    async def before(self, work: Awaitable[T]) -> T | None:
        """``work``'s result, or None when a stop is requested first (``work`` is then
        cancelled)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.requested.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return task.result()

    async def stop(self, server: uvicorn.Server) -> None:
        """Ask ``server`` to stop once a stop is requested, and to force it if forced."""
        await self.requested.wait()
        server.should_exit = True
        draining(True)  # open SSE streams end now instead of holding the shutdown
        await self.forced.wait()
        server.force_exit = True


async def _serve_until_stopped(
    broker: Broker,
    proxy_settings: ProxySettings | None,
    api: uvicorn.Config | None,
    progress: Progress | None,
    announce: Announce,
    jobs: JobService | None = None,
) -> None:
    """Log in the proxy's pools and listen (when ``proxy_settings``), then serve the API (when
    ``api``) or wait, until SIGINT or SIGTERM; close the proxy on the way out. The job loop
    (when ``jobs``) runs from the start until the end."""
    loop = asyncio.get_running_loop()
    shutdown = _Shutdown()
    shutdown.install(loop)
    job_loop = None if jobs is None else asyncio.ensure_future(jobs.run())
    try:
        proxy = None
        if proxy_settings is not None:
            proxy = await shutdown.before(_start_proxy(broker, proxy_settings, progress, announce))
            if proxy is None:
                logger.info("stopped before serving")
                return
            if api is not None:
                _show_pools(api, proxy)
        try:
            if api is None:
                await shutdown.requested.wait()
                return
            server = _AnnouncingServer(api, announce)
            stopping = asyncio.ensure_future(shutdown.stop(server))
            try:
                await server.serve()
            finally:
                stopping.cancel()
                draining(False)
        finally:
            if proxy is not None:
                await proxy.close()
    finally:
        if jobs is not None and job_loop is not None:
            jobs.stop()
            try:
                await asyncio.wait_for(job_loop, 10)
            except (TimeoutError, asyncio.CancelledError):
                logger.warning("the job loop did not stop in time")
        shutdown.remove(loop)


def _run(
    broker: Broker,
    config_path: Path,
    *,
    proxy: ProxySettings | None,
    api_listen: str | None,
    progress: Progress | None,
    announce: Announce,
) -> None:
    """The start-up skeleton of ``serve`` and ``proxy``: configure logs, start fetching the
    required providers, keep tokens warm, then on one uvloop event loop log in the pools,
    listen, announce each listener, wait for SIGINT or SIGTERM (:class:`_Shutdown`) and close
    the listeners; the broker is closed last, whatever happened.

    Args:
        broker: The broker to serve; this function closes it.
        config_path: The YAML configuration ``broker`` was read from (for its warnings).
        proxy: The proxy to run, or None for none.
        api_listen: ``host:port`` of the HTTP API, or None for no API.
        progress: Called as ``progress(done, total)`` while pool accounts log in.
        announce: Receives one line per listener once it listens.
    """
    stop = threading.Event()
    tracer = None
    try:
        _configure_logs(broker, config_path)
        tracer = _start_tracing(broker)
        jobs = None
        if api_listen is not None:
            jobs = JobService(broker)
            broker.events.subscribe(log_job_event)
        api = None if api_listen is None else _api_config(broker, api_listen, jobs)
        _fetch_required(broker)
        if proxy is None:  # (the proxy's own tick keeps tokens warm otherwise)
            threading.Thread(target=_keep_warm, args=(broker, stop), daemon=True).start()
        uvloop.run(_serve_until_stopped(broker, proxy, api, progress, announce, jobs))
    except KeyboardInterrupt:  # Ctrl-C before the loop caught the signals
        logger.info("stopped before serving")
    finally:
        stop.set()
        broker.close()
        if tracer is not None:  # export what is still buffered
            install(None)
            tracer.shutdown()


def serve(
    config_path: Path,
    listen: str | None = None,
    *,
    progress: Progress | None = None,
    announce: Announce = print,
) -> None:
    """Run the broker's HTTP API (and the proxy, if configured) until SIGINT or SIGTERM.

    Args:
        config_path: The YAML configuration.
        listen: ``host:port``; default ``server.listen`` from the config, else 127.0.0.1:8750.
        progress: Called as ``progress(done, total)`` while pool accounts log in.
        announce: Receives one line per listener once it listens.
    """
    broker = Broker.from_config(config_path)
    address = listen or broker.settings.server.listen
    _run(
        broker,
        config_path,
        proxy=broker.settings.proxy,
        api_listen=address,
        progress=progress,
        announce=announce,
    )


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
    _run(
        broker,
        config_path,
        proxy=settings,
        api_listen=None,
        progress=progress,
        announce=announce,
    )
