"""What the status page shows, as plain data: one dict per row (provider, pool, job) and one
for the service. The page renders it and ``/v1/events`` streams it; both read it from here.

Every value is a name, a state, a count, an error class or code, or a time (epoch seconds):
never a token, a secret, a consumer key or a store URL (a PostgreSQL URL may hold a
password: only its scheme is shown). Times are absolute so the page can count "expires in"
and "heartbeat age" down by itself without an update per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ... import __version__
from ...core.crypto import Keyring
from ...engine.broker import Broker
from ...jobs.model import Job, JobStatus
from ...jobs.service import JobService

__all__ = ["PoolSource", "Snapshot", "StatusView", "take_snapshot"]

#: Jobs shown (the newest).
SHOWN_JOBS = 50
_ACTIVE = {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELING}


class PoolSource(Protocol):
    """What the page reads of the token proxy running in the same process."""

    def pool_stats(self) -> list[tuple[Any, Any]]:
        """Each pool route with a snapshot of its pool (a proxy ``PoolStats``)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every item's state at one moment, by item id (``provider:NAME``, ``pool:PREFIX``,
    ``job:ID``, ``service``), in display order."""

    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The rows of one kind (``provider``, ``pool``, ``job``), in display order."""
        return [data for item, data in self.items.items() if item.startswith(kind + ":")]

    @property
    def service(self) -> dict[str, Any]:
        """The service row."""
        return self.items.get("service", {})


@dataclass
class StatusView:
    """The sources of a :class:`Snapshot`.

    Attributes:
        broker: The broker (provider states, settings, degraded parts).
        jobs: The job service (the newest jobs).
        started: When the process started serving (epoch seconds), for the uptime.
        pools: The in-process proxy's pools, once it runs (``serve`` sets it); None: no proxy
            in this process, so the page says pools are not visible here.
        last_codes: Per provider, the code of its last failure since its last success.
    """

    broker: Broker
    jobs: JobService
    started: float = field(default_factory=time.time)
    pools: PoolSource | None = None
    last_codes: Mapping[str, str] = field(default_factory=dict)
    key_id: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        keys = self.broker.settings.encryption_keys
        self.key_id = Keyring(keys).primary_id if keys else None

    def snapshot(self) -> Snapshot:
        """Take one (blocking: it reads the job store)."""
        return take_snapshot(self)


def take_snapshot(view: StatusView) -> Snapshot:
    """The state of every item :class:`StatusView` knows about (blocking)."""
    items: dict[str, dict[str, Any]] = {}
    for row in _providers(view.broker, view.last_codes):
        items["provider:" + row["name"]] = row
    for row in _pools(view.pools):
        items["pool:" + row["prefix"]] = row
    jobs, _ = view.jobs.list(limit=SHOWN_JOBS)
    for job in jobs:
        items["job:" + job.job_id] = job_row(job)
    items["service"] = _service(view)
    return Snapshot(items)


def _providers(broker: Broker, codes: Mapping[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, state in broker.provider_summaries().items():
        spec = broker.settings.providers[name]
        grant = spec.grant
        rows.append(
            {
                "name": name,
                "grant": grant,
                "state": state.state,
                "severity": state.severity,
                "expires_at": state.valid_until,
                "last_refresh": state.last_refresh,
                "last_error": state.last_error,
                "last_code": codes.get(name) if state.last_error else None,
                # Re-authorise starts an authorize job: only with an authorization block.
                "reauthorizable": getattr(spec, "authorization", None) is not None,
            }
        )
    rows.sort(key=lambda r: (-int(r["severity"]), str(r["name"])))
    return rows


def _pools(pools: PoolSource | None) -> list[dict[str, Any]]:
    if pools is None:
        return []
    rows = []
    for route, stats in pools.pool_stats():
        states = [c.state.value for c in stats.credentials]
        rows.append(
            {
                "prefix": route.spec.prefix,
                "provider": route.spec.provider,
                "leased": stats.in_use,
                "idle": stats.available,
                "refreshing": states.count("refreshing"),
                "failed": states.count("failed"),
                "waiting": stats.waiting,
                "oldest_wait": (None if stats.oldest_wait is None else round(stats.oldest_wait, 1)),
            }
        )
    return rows


def job_row(job: Job) -> dict[str, Any]:
    """One job as the page shows it (its params name a provider at most, never a secret)."""
    provider = job.params.get("provider")
    return {
        "job_id": job.job_id,
        "kind": job.kind,
        "provider": provider if isinstance(provider, str) else None,
        "status": job.status.value,
        "phase": job.phase,
        "progress": round(job.progress, 1),
        "heartbeat_at": job.heartbeat_at,
        "updated_at": job.updated_at,
        "items": {"total": job.items.total, "ok": job.items.ok, "failed": job.items.failed},
        "failed": [{"item": f.item, "reason": f.reason} for f in job.failed[:10]],
        "error": None if job.error is None else job.error.type,
        "cancellable": job.status in _ACTIVE,
        "retryable": job.status in (JobStatus.PARTIAL, JobStatus.FAILED)
        and any(f.retryable for f in job.failed),
    }


def _service(view: StatusView) -> dict[str, Any]:
    degraded = view.broker.degraded()
    return {
        "degraded": bool(degraded),
        "degraded_parts": sorted(degraded),
        "store": view.broker.settings.store.partition(":")[0],
        "key_id": view.key_id,
        "version": __version__,
        "started": view.started,
        "pools_visible": view.pools is not None,
    }


#: Builds a snapshot (the feed's source).
SnapshotTaker = Callable[[], Snapshot]
