"""Prometheus metrics on an injected registry; the only module importing prometheus_client.

:class:`Metrics` subscribes to the broker's events. Labels carry provider names,
outcomes, route templates and states — never a token, a consumer key or a path
with ids (STYLE 11).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .broker import Broker
from .events import Event, TokenAcquired, TokenInvalidated, TokenRequestFailed

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        self.registry.register(_CredentialStates(broker))
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

    def render(self) -> bytes:
        """The exposition text for ``/metrics``."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Stop counting events."""
        self._unsubscribe()
