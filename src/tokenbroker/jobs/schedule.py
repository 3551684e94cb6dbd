"""Scheduled jobs (``jobs.schedule``): each period of a schedule starts once per store.

Every instance ticks its scheduler; for each due period it asks the store to claim
``(schedule name, period)`` (:meth:`~tokenbroker.store.base.JobStore.claim_schedule`), and
only the one instance that gets the claim starts the job — the store decides, so several
processes on one store start a scheduled run once. Periods are read on the store's clock:
``every-N`` is ``floor(now / every_seconds)``; ``at_startup`` is claimed once per process
start as ``startup-W``, ``W = floor(now / STARTUP_WINDOW)``, so processes starting together
(within one window) start it once. A run refused by the jobs limits (a full queue, see
``jobs.max_queued``) is skipped with a warning; the next period tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..config import JobSchedule
from ..errors import JobLimitError
from ..store import Store

__all__ = ["STARTUP_WINDOW", "Scheduler"]

logger = logging.getLogger("tokenbroker.jobs")

#: Seconds within which instances starting together share one start-up run.
STARTUP_WINDOW = 300.0


class Scheduler:
    """Starts scheduled jobs when their period comes, once per store.

    Args:
        store: The store (its clock and its schedule claims).
        schedules: The ``jobs.schedule`` entries.
        owner: This instance's owner id.
        start: Starts a job: ``(kind, params, requested_by)``.
    """

    def __init__(
        self,
        store: Store,
        schedules: tuple[JobSchedule, ...],
        owner: str,
        start: Callable[[str, Mapping[str, Any], str], object],
    ) -> None:
        self.store = store
        self.schedules = schedules
        self.owner = owner
        self.start = start
        self._booted = False

    def __repr__(self) -> str:
        return f"Scheduler(schedules={[s.name for s in self.schedules]})"

    def tick(self) -> list[str]:
        """Start every schedule whose period this instance claims now (blocking).

        Returns:
            The names of the schedules started.
        """
        now = self.store.now()
        started = []
        for entry in self.schedules:
            periods = []
            if entry.at_startup and not self._booted:
                periods.append(f"startup-{int(now // STARTUP_WINDOW)}")
            if entry.every_seconds is not None:
                periods.append(f"every-{int(now // entry.every_seconds)}")
            for period in periods:
                if self.store.claim_schedule(entry.name, period, self.owner):
                    try:
                        self.start(entry.kind, entry.params, f"schedule:{entry.name}")
                    except JobLimitError:  # the queue is full: this period's run is skipped
                        logger.warning(
                            "scheduled job refused schedule=%s period=%s reason=too_many_jobs",
                            entry.name,
                            period,
                        )
                        continue
                    logger.info("scheduled job started schedule=%s period=%s", entry.name, period)
                    started.append(entry.name)
        self._booted = True
        return started
