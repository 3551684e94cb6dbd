"""The proxy server: listeners, routes, pool warm-up and the maintenance tick."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..cluster import windows_for
from ..config import ProxySettings
from ..core.clock import Clock, SystemClock
from ..edge.descriptors import budget
from ..edge.ratelimit import RateLimits
from ..engine.broker import Broker
from ..engine.cache import DEGRADED
from ..engine.consumers import ConsumerRegistry
from ..errors import ProviderError
from ..telemetry.metrics import ProxyMetrics
from .connection import ClientConnection
from .health import HealthConnection
from .pool import PoolStats
from .routes import Route, RouteTable
from .timeouts import ClientTimeouts

__all__ = ["ProxyServer"]

logger = logging.getLogger("tokenbroker.proxy")

Progress = Callable[[int, int], None]


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class ProxyServer:
    """The token-injecting reverse proxy (``tokenbroker proxy``).

    Args:
        broker: Obtains and caches the tokens (the caller owns and closes it).
        settings: The ``proxy:`` section.
        consumers: Who may use the proxy when ``consumer_header`` is set; default:
            the broker's configured and stored consumers. While the proxy listens it
            follows the store (:meth:`ConsumerRegistry.follow`), so added and removed
            consumers take effect within a second.
        clock: Time source of the start time and the token pools (default: the system's);
            timers and deadlines use the event loop's time.

    Attributes:
        max_connections: Client connections held at once (``max_client_connections``,
            else derived from the descriptor limit); a connection beyond it gets 503 and
            is closed at once.
    """

    def __init__(
        self,
        broker: Broker,
        settings: ProxySettings,
        *,
        consumers: ConsumerRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.routes = RouteTable(
            Route(spec, broker, settings, clock=self.clock) for spec in settings.routes
        )
        header = settings.consumer_header
        self.key_header = frozenset({header.lower().encode()}) if header else frozenset()
        self.consumers: ConsumerRegistry | None = None
        if header:
            self.consumers = consumers or ConsumerRegistry.load(
                broker.settings.consumers, broker.store, broker.coordinator
            )
        self.limits = RateLimits(
            shared=windows_for(broker.coordinator)
        )  # wrong consumer keys per client address, as in the API
        self.connections: set[ClientConnection] = set()
        self.max_connections = (
            settings.max_client_connections or budget(with_proxy=True).proxy_clients
        )
        self.responses: dict[int, int] = {}
        self.rejected: dict[str, int] = {}
        self.started = self.clock.time()
        self.timeouts = ClientTimeouts(settings)
        self.metrics = ProxyMetrics(self)
        self._servers: list[asyncio.Server] = []
        self._tick: asyncio.Task[None] | None = None
        self._timeouts: asyncio.Task[None] | None = None
        self._follow: asyncio.Task[None] | None = None
        self.url = ""
        self.health_url = ""

    async def start(self, *, health: bool = True) -> None:
        """Listen on ``listen`` (and ``health_listen``), start the maintenance tick, and follow
        the stored consumers when keys are required."""
        loop = asyncio.get_running_loop()
        host, port = _split(self.settings.listen)
        server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=1024
        )
        self._servers.append(server)
        self.url = _url(server)
        if health and self.settings.health_listen:
            host, port = _split(self.settings.health_listen)
            probe = await loop.create_server(
                lambda: HealthConnection(self), host, port, reuse_address=True
            )
            self._servers.append(probe)
            self.health_url = _url(probe)
        self._tick = loop.create_task(self._maintain())
        self._timeouts = loop.create_task(self._expire())
        if self.consumers is not None:
            self._follow = loop.create_task(self.consumers.follow())

    async def warm(self, progress: Progress | None = None) -> dict[str, ProviderError]:
        """Log in every account of every pool route, a few at a time.

        Args:
            progress: Called as ``progress(done, total)`` over all pool accounts.

        Returns:
            Failed accounts (``provider/account``) and their errors.
        """
        pools = [route.pool for route in self.routes.routes if route.pool is not None]
        total = sum(pool.stats().total for pool in pools)
        done_before = 0
        failures: dict[str, ProviderError] = {}
        for pool in pools:
            offset = done_before

            def report(done: int, _: int, offset: int = offset) -> None:
                if progress is not None:
                    progress(offset + done, total)

            failed = await pool.warm(concurrency=self.settings.login_concurrency, progress=report)
            failures.update({f"{pool.provider}/{name}": exc for name, exc in failed.items()})
            accounts = pool.stats().total
            logger.debug(
                "pool warmed provider=%s accounts=%d failed=%d",
                pool.provider,
                accounts,
                len(failed),
            )
            done_before += accounts
        return failures

    def pool_stats(self) -> list[tuple[Route, PoolStats]]:
        """Each pool route with a snapshot of its pool."""
        return [(r, r.pool.stats()) for r in self.routes.routes if r.pool is not None]

    def ready(self) -> bool:
        """The proxy listens, every pool route has a token free or leasable, and every
        ``required: true`` provider has a token for its configured scopes."""
        if not self._servers or self.broker.unready():
            return False
        return all(stats.available > 0 for _, stats in self.pool_stats())

    def health(self) -> dict[str, Any]:
        """The ``/health`` document: totals over the pools, each route, and each routed
        provider's worst state (configured scopes, every pool account); ``degraded`` when not
        :meth:`ready` or a routed provider is stale, failed or needs reauthorization. No
        secrets."""
        pools = self.pool_stats()
        total = {"total": 0, "in_use": 0, "available": 0, "waiting": 0}
        for _, stats in pools:
            total["total"] += stats.total
            total["in_use"] += stats.in_use
            total["available"] += stats.available
            total["waiting"] += stats.waiting
        routes = []
        for route in self.routes.routes:
            entry: dict[str, Any] = {
                "prefix": route.spec.prefix,
                "provider": route.provider,
                "mode": route.spec.mode,
                "upstream_connections_idle": route.upstream.idle,
            }
            if route.pool is not None:
                stats = route.pool.stats()
                entry["pool"] = {
                    "total": stats.total,
                    "in_use": stats.in_use,
                    "available": stats.available,
                    "waiting": stats.waiting,
                    "credentials": [
                        {
                            "account": c.account,
                            "state": c.state.value,
                            "uses": c.uses,
                            "errors": c.errors,
                            "refreshes": c.refreshes,
                            "idle_seconds": None
                            if c.idle_seconds is None
                            else round(c.idle_seconds, 3),
                        }
                        for c in stats.credentials
                    ],
                }
            routes.append(entry)
        states = self.broker.provider_states()
        providers = {r.provider: states[r.provider] for r in self.routes.routes}
        healthy = self.ready() and not any(s in DEGRADED for s in providers.values())
        return {
            "status": "ok" if healthy else "degraded",
            "providers": providers,
            "pool": total,
            "connections": len(self.connections),
            "routes": routes,
        }

    def count_status(self, status: int) -> None:
        """Count one response to a client by status."""
        self.responses[status] = self.responses.get(status, 0) + 1

    def count_rejected(self, route: Route) -> None:
        """Count one upstream 401 that was retried with a new token."""
        self.rejected[route.provider] = self.rejected.get(route.provider, 0) + 1

    async def close(self) -> None:
        """Stop listening, close client connections and pools (not the broker)."""
        for task in (self._tick, self._timeouts, self._follow):
            if task is not None:
                task.cancel()
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.close()
        for route in self.routes.routes:
            route.upstream.close()
            if route.pool is not None:
                route.pool.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self.metrics.close()

    async def _maintain(self) -> None:
        """Keep tokens warm every ``refresh_check_seconds``; every second at most, reap idle
        leases, close stale upstream connections, drop clients whose request head or body did
        not arrive in time or who stopped reading, and close client connections idle for
        ``client_keepalive_seconds``."""
        loop = asyncio.get_running_loop()
        every = self.settings.refresh_check_seconds
        # The client timers keep a tick of at most 1 s whatever refresh_check_seconds says
        # (tpp users set 30 or 60); the refresh check runs on its own schedule beside them.
        tick = min(every, 1.0)
        refresh_at = loop.time() + every
        while True:
            await asyncio.sleep(tick)
            try:
                now = loop.time()
                for connection in list(self.connections):
                    self.timeouts.enforce(connection, now)
                if now >= refresh_at:
                    refresh_at = now + every
                    self.broker.refresh_due()
                for route in self.routes.routes:
                    route.upstream.sweep()
                    if route.pool is not None and route.pool.reap():
                        for connection in list(self.connections):
                            if connection.holds_expired_lease():
                                connection.close()
            except Exception:
                logger.exception("proxy maintenance tick failed")

    async def _expire(self) -> None:
        """Answer 504 for upstreams that did not answer in time (checked 10 times a second)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.1)
            for route in self.routes.routes:
                route.upstream.expire(loop.time())

    def __repr__(self) -> str:
        return f"<ProxyServer url={self.url!r} routes={len(self.routes.routes)}>"


def _url(server: asyncio.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"http://{host}:{port}"
