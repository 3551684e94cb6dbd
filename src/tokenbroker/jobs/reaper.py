"""The reaper: nothing stays ``running`` after its instance died.

A job whose lease expired on the store's clock (its owner stopped heartbeating: killed,
frozen, partitioned) is taken over by claiming it — the claim bumps the fence, so the old
owner, should it wake up, can write nothing more. An idempotent kind's job is then resumed
from its remaining items (by this instance's runner); any other ends ``failed`` with
``error.type = "worker_lost"`` and its final event. The reaper also prunes finished jobs
older than ``jobs.result_ttl_seconds``. It runs at start-up and every poll of the service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import JobsSettings
from ..store import JobLease, JobRow, Store
from .kinds import KINDS
from .runner import JobRunner

__all__ = ["Reaped", "Reaper"]

logger = logging.getLogger("tokenbroker.jobs")


@dataclass
class Reaped:
    """What one pass of the reaper did.

    Attributes:
        resumed: Ids of jobs taken over to be resumed here.
        failed: Ids of jobs ended ``failed`` / ``worker_lost``.
        pruned: How many finished jobs were deleted.
    """

    resumed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    pruned: int = 0


class Reaper:
    """Takes over jobs whose lease expired.

    Args:
        store: The store.
        runner: This instance's runner (ends non-idempotent jobs).
        owner: This instance's owner id.
        settings: The ``jobs:`` settings.
        resume: Starts running a taken-over job (the service's spawn).
        parked: Decides about an expired job of a parked kind (``authorize``: leave it
            while it waits for a person); True when it ended the job.
    """

    def __init__(
        self,
        store: Store,
        runner: JobRunner,
        owner: str,
        settings: JobsSettings,
        resume: Callable[[JobLease, JobRow], None],
        *,
        parked: Callable[[JobRow], bool] | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.owner = owner
        self.settings = settings
        self.resume = resume
        self.parked = parked

    def __repr__(self) -> str:
        return f"Reaper(owner={self.owner!r})"

    async def reap(self) -> Reaped:
        """One pass: take over every expired job, then prune old finished ones.

        Returns:
            What was done.
        """
        done = Reaped()
        for row in await asyncio.to_thread(self.store.expired_jobs):
            kind = KINDS.get(row.kind)
            if kind is not None and kind.parked and self.parked is not None:
                if await asyncio.to_thread(self.parked, row):
                    done.failed.append(row.id)
                continue
            lease = await asyncio.to_thread(
                self.store.claim_job, row.id, self.owner, self.settings.lease_seconds
            )
            if lease is None:  # another instance took it first
                continue
            if kind is not None and kind.idempotent:
                logger.warning("job resumed after its worker was lost job_id=%s", row.id)
                self.resume(lease, row)
                done.resumed.append(row.id)
            else:
                logger.warning("job failed: its worker was lost job_id=%s", row.id)
                if await self.runner.fail_lost(lease, row):
                    done.failed.append(row.id)
        done.pruned = await asyncio.to_thread(
            self.store.prune_jobs, self.settings.result_ttl_seconds
        )
        return done
