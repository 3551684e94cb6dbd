"""Prometheus metrics on an injected registry; the only module importing prometheus_client.

:class:`Metrics` subscribes to the broker's events. Labels carry provider names,
outcomes, route templates and states — never a token, a consumer key or a path
with ids (STYLE 11).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core.events import (
    Event,
    JobFinished,
    JobItemFinished,
    JobPhaseChanged,
    JobStarted,
    TokenAcquired,
    TokenInvalidated,
    TokenRequestFailed,
)
from ..engine.broker import Broker

if TYPE_CHECKING:
    from ..config import ProxySettings
    from ..proxy.pool import PoolStats

__all__ = ["CONTENT_TYPE", "PHASE_BUCKETS", "TPP_GAUGES", "Metrics", "ProxyMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Phase duration buckets (seconds): a login phase takes milliseconds, warming 200 accounts
#: or re-encrypting a large store takes minutes to hours.
PHASE_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)


class ProxyView(Protocol):
    """What the proxy metrics read from the proxy server."""

    broker: Broker
    settings: ProxySettings
    responses: dict[int, int]
    rejected: dict[str, int]
    connections: Any

    def pool_stats(self) -> list[tuple[Any, PoolStats]]:
        """Each pool route with its pool's snapshot."""


class _CredentialStates(Collector):
    """``tokenbroker_credentials{state}``, read from the cache at scrape time."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tokenbroker_credentials", "Cached credentials by state.", labels=["state"]
        )
        counts: dict[str, int] = {}
        for slot in self._broker.states():
            counts[slot.state] = counts.get(slot.state, 0) + 1
        for state, count in sorted(counts.items()):
            family.add_metric([state], count)
        return [family]


class _Degraded(Collector):
    """``tokenbroker_degraded{component}``: 1 while the broker runs without that part (Redis
    unreachable), read from the broker at scrape time; 0 for a configured part that works."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tokenbroker_degraded",
            "1 while a part of the broker is unavailable and it serves without it.",
            labels=["component"],
        )
        missing = self._broker.degraded()
        if self._broker.coordinator is not None or missing:
            family.add_metric(["redis"], 1 if "redis" in missing else 0)
        return [family]


class Metrics:
    """The broker's Prometheus metrics.

    Args:
        broker: Whose events to count.
        registry: Where the metrics live (a fresh one by default, so tests stay isolated).
    """

    def __init__(self, broker: Broker, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.token_requests = Counter(
            "tokenbroker_token_requests_total",
            "Token requests to providers, by outcome (ok or the error code).",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.refresh_duration = Histogram(
            "tokenbroker_refresh_duration_seconds",
            "Duration of token exchanges with providers, retries included.",
            ["provider"],
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "tokenbroker_cache_misses_total",
            "Token reads a caller had to wait for (cold or expired key).",
            ["provider"],
            registry=self.registry,
        )
        self.invalidations = Counter(
            "tokenbroker_invalidations_total",
            "Tokens dropped because a consumer reported them rejected.",
            ["provider"],
            registry=self.registry,
        )
        self.consumer_requests = Counter(
            "tokenbroker_consumer_requests_total",
            "Requests to the broker's HTTP API, by route template and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.token_reads = Counter(
            "tokenbroker_token_reads_total",
            "Tokens handed to consumers over HTTP.",
            ["provider"],
            registry=self.registry,
        )
        self.up = Gauge("tokenbroker_up", "1 while the broker runs.", registry=self.registry)
        self.up.set(1)
        self.jobs = Counter(
            "tokenbroker_jobs_total",
            "Jobs that reached a final status, by kind and status.",
            ["kind", "status"],
            registry=self.registry,
        )
        self.jobs_running = Gauge(
            "tokenbroker_jobs_running",
            "Jobs running on this instance, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.phase_duration = Histogram(
            "tokenbroker_job_phase_duration_seconds",
            "How long job phases took, by kind and phase.",
            ["kind", "phase"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.job_items = Counter(
            "tokenbroker_job_items_total",
            "Job items that ended, by kind and outcome (ok or failed).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.sse_streams = Gauge(
            "tokenbroker_sse_streams",
            "Open Server-Sent Event streams of jobs.",
            registry=self.registry,
        )
        self.sse_streams.set_function(lambda: 0)
        # The running jobs by id, so a repeated or unmatched JobFinished cannot push the
        # gauge below the truth; ids stay here, never in a label.
        self._running: dict[str, str] = {}
        self._running_lock = threading.Lock()
        self.registry.register(_CredentialStates(broker))
        self.registry.register(_Degraded(broker))
        self._unsubscribe = broker.subscribe(self.on_event)

    def __repr__(self) -> str:
        return "Metrics()"

    def on_event(self, event: Event) -> None:
        """Count one broker event."""
        if isinstance(event, TokenAcquired):
            self.token_requests.labels(event.provider, "ok").inc()
            self.refresh_duration.labels(event.provider).observe(event.duration)
            if not event.background:
                self.cache_misses.labels(event.provider).inc()
        elif isinstance(event, TokenRequestFailed):
            self.token_requests.labels(event.provider, event.code).inc()
            self.refresh_duration.labels(event.provider).observe(event.duration)
        elif isinstance(event, TokenInvalidated):
            self.invalidations.labels(event.provider).inc()
        elif isinstance(event, JobItemFinished):
            self.job_items.labels(event.kind, event.outcome).inc()
        elif isinstance(event, JobPhaseChanged):
            if event.previous is not None and event.previous_duration is not None:
                self.phase_duration.labels(event.kind, event.previous).observe(
                    event.previous_duration
                )
        elif isinstance(event, JobStarted):
            with self._running_lock:
                if event.job_id in self._running:
                    return
                self._running[event.job_id] = event.kind
            self.jobs_running.labels(event.kind).inc()
        elif isinstance(event, JobFinished):
            self._on_job_finished(event)

    def _on_job_finished(self, event: JobFinished) -> None:
        self.jobs.labels(event.kind, event.status).inc()
        if event.phase is not None and event.phase_duration is not None:
            self.phase_duration.labels(event.kind, event.phase).observe(event.phase_duration)
        with self._running_lock:
            kind = self._running.pop(event.job_id, None)
        if kind is not None:
            self.jobs_running.labels(kind).dec()

    def count_streams(self, count: Callable[[], int]) -> None:
        """Read ``tokenbroker_sse_streams`` from ``count()`` at each scrape.

        Args:
            count: Returns the open job event streams (e.g. the SSE hub's subscriber
                count); called from the scraping thread, so it must be cheap and thread-safe.
        """
        self.sse_streams.set_function(count)

    def render(self) -> bytes:
        """The exposition text for ``/metrics``."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Stop counting events."""
        self._unsubscribe()


class _ProxyCollector(Collector):
    """The proxy's pool and response figures, read at scrape time (no per-request cost)."""

    def __init__(self, server: ProxyView) -> None:
        self._server = server

    def collect(self) -> list[Metric]:
        tokens = GaugeMetricFamily(
            "tokenbroker_pool_tokens", "Pool tokens by state.", labels=["route", "state"]
        )
        waiting = GaugeMetricFamily(
            "tokenbroker_pool_waiting", "Client connections waiting for a token.", labels=["route"]
        )
        per_credential = {
            kind: CounterMetricFamily(
                f"tokenbroker_pool_credential_{kind}",
                text,
                labels=["route", "provider", "account"],
            )
            for kind, text in (
                ("uses", "Requests served with the account's token."),
                ("errors", "Rejected tokens and failed logins of the account."),
                ("refreshes", "Logins of the account."),
            )
        }
        for route, stats in self._server.pool_stats():
            prefix = route.spec.prefix
            tokens.add_metric([prefix, "in_use"], stats.in_use)
            tokens.add_metric([prefix, "available"], stats.available)
            tokens.add_metric([prefix, "total"], stats.total)
            waiting.add_metric([prefix], stats.waiting)
            for c in stats.credentials:
                labels = [prefix, route.provider, c.account]
                per_credential["uses"].add_metric(labels, c.uses)
                per_credential["errors"].add_metric(labels, c.errors)
                per_credential["refreshes"].add_metric(labels, c.refreshes)
        responses = CounterMetricFamily(
            "tokenbroker_proxy_responses",
            "Responses to proxy clients by status.",
            labels=["status"],
        )
        for status, count in sorted(self._server.responses.items()):
            responses.add_metric([str(status)], count)
        rejected = CounterMetricFamily(
            "tokenbroker_proxy_upstream_rejections",
            "Upstream 401s answered by re-reading the token and retrying.",
            labels=["provider"],
        )
        for provider, count in sorted(self._server.rejected.items()):
            rejected.add_metric([provider], count)
        connections = GaugeMetricFamily("tokenbroker_proxy_connections", "Open client connections.")
        connections.add_metric([], len(self._server.connections))
        families: list[Metric] = [
            tokens,
            waiting,
            *per_credential.values(),
            responses,
            rejected,
            connections,
        ]
        if self._server.settings.metrics_compat == "tpp":
            families += _tpp_gauges([stats for _, stats in self._server.pool_stats()])
        return families


#: tpp's pool gauges (its README's table and ``src/health.rs``): name, help text as tpp
#: words it, and the :class:`PoolStats` field summed over the pool routes.
TPP_GAUGES = (
    ("tpp_tokens_total", "Total number of tokens in the pool", "total"),
    ("tpp_tokens_in_use", "Number of tokens currently in use", "in_use"),
    ("tpp_tokens_available", "Number of tokens available", "available"),
    ("tpp_requests_waiting", "Number of requests waiting for a token", "waiting"),
)


def _tpp_gauges(pools: list[PoolStats]) -> list[Metric]:
    """``proxy.metrics_compat: tpp``: tpp's four unlabelled gauges, each the sum over every
    pool route (tpp had one pool), so dashboards built on tpp keep working."""
    families: list[Metric] = []
    for name, text, field in TPP_GAUGES:
        family = GaugeMetricFamily(name, text)
        family.add_metric([], sum(getattr(stats, field) for stats in pools))
        families.append(family)
    return families


class ProxyMetrics(Metrics):
    """The broker's metrics plus the proxy's pools, lease waits and responses.

    Args:
        server: The proxy (a :class:`tokenbroker.proxy.ProxyServer`).
    """

    def __init__(self, server: ProxyView) -> None:
        super().__init__(server.broker)
        self.lease_wait = Histogram(
            "tokenbroker_pool_lease_wait_seconds",
            "Time client connections waited for a pool token.",
            ["provider"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.registry.register(_ProxyCollector(server))
        self._unsubscribers = [
            route.pool.subscribe(self._on_lease)
            for route, _ in server.pool_stats()
            if route.pool is not None
        ]

    def _on_lease(self, event: Event) -> None:
        wait = getattr(event, "wait", None)
        if wait is not None:
            self.lease_wait.labels(event.provider).observe(wait)

    def close(self) -> None:
        """Stop counting events."""
        super().close()
        for unsubscribe in self._unsubscribers:
            unsubscribe()
