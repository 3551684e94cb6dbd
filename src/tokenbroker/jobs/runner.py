"""The runner: carries out one claimed job — phases, items, retries, heartbeats, cancel.

A job runs while its instance holds the job's lease
(:meth:`~tokenbroker.store.base.JobStore.claim_job`). A heartbeat task renews it every
``jobs.heartbeat_seconds`` (lease ``jobs.lease_seconds``); a lost lease (another instance
took the job over) stops the work at once and nothing more is written: every save is fenced.
The kind's phases run in order (see :mod:`tokenbroker.jobs.kinds.base`); items run
``concurrency`` at a time in worker threads. A failed item is retried per
:class:`~tokenbroker.jobs.policy.ItemRetryPolicy` (transient errors only, at most 3
attempts, full-jitter backoff); then it is recorded in ``failed[]`` with an ``item_failed``
event. Every attempt is a real request: before each one the runner also waits until the
token cache stops serving the item's remembered failure
(:meth:`~tokenbroker.jobs.kinds.JobKind.retry_wait`, the cache's own backoff, 0.5-1 s after
one failure, 1-2 s after two). The cache's memory is never cleared, so its guarantees hold
(one request for N callers; a reauthorization error stays until re-authorisation). When
the cache will not ask again within the policy's ``max_backoff`` (a reauthorization error,
or a key that failed many times before the job), the attempt gets the remembered error and
the item fails without further attempts.

Progress is saved with a ``phase_update`` event at most ``max_per_second`` times a second
(:class:`~tokenbroker.jobs.progress.ProgressCoalescer`); a phase change and the end always
go out. The resume state saved with it lists the items finished, so a resumed job skips
them (an item finished after the last save runs again: only idempotent kinds are resumed).

Cancellation: the store marks a running job ``canceling``; the runner sees it at the next
save or heartbeat (or at once, when the cancel came through this instance's service),
starts no new item, lets the items in flight finish, and only then saves ``canceled`` with
its final event. Every time is read from the injected clock; saves are serialised, so the
stored progress never goes backwards.

Lifecycle events: the runner publishes :class:`~tokenbroker.core.events.JobStarted`,
:class:`~tokenbroker.core.events.JobPhaseChanged` (each phase entered),
:class:`~tokenbroker.core.events.JobItemFinished` (one per item, after its retries) and
:class:`~tokenbroker.core.events.JobFinished` on the broker's event bus, for the metrics and
the job log lines (:mod:`tokenbroker.telemetry`) to subscribe to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Iterator

from ..config import JobsSettings
from ..core import tracing
from ..core.clock import Clock
from ..core.events import JobFinished, JobItemFinished, JobPhaseChanged, JobStarted
from ..engine.broker import Broker
from ..store import JobLease, JobRow, NewJobEvent
from .document import Progress, encode, event_data, job_of, progress_of
from .events import Canceled, Completed, Failed, ItemFailed, JobEvent, PhaseUpdate
from .kinds import JobKind, KindContext, kind_for
from .model import FailedItem, ItemCounts, Job, JobError, JobStatus
from .policy import ItemRetryPolicy, failure, job_outcome, reason
from .progress import ProgressCoalescer, ProgressTracker

__all__ = ["JobRunner"]

logger = logging.getLogger("tokenbroker.jobs")
#: The span of one phase of a job (a child of the job's ``tokenbroker.job`` span).
_PHASE = "tokenbroker.job.phase"


class JobRunner:
    """Runs claimed jobs of one instance.

    Args:
        broker: Tokens and the store.
        settings: The ``jobs:`` settings.
        clock: Where every time comes from.
        notify: Called with a job id after each write (wakes waiting readers).
        rng: Jitter source for retry backoff (tests inject a seeded one).
    """

    def __init__(
        self,
        broker: Broker,
        settings: JobsSettings,
        clock: Clock,
        notify: Callable[[str], None],
        rng: random.Random | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.clock = clock
        self.notify = notify
        self.policy = ItemRetryPolicy(backoff=settings.retry_backoff_seconds)
        self.coalescer: ProgressCoalescer[PhaseUpdate] = ProgressCoalescer(clock)
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._running: dict[str, _Execution] = {}

    def __repr__(self) -> str:
        return f"JobRunner(running={len(self._running)})"

    @property
    def running(self) -> list[str]:
        """Ids of the jobs this runner is running now."""
        return list(self._running)

    def request_cancel(self, job_id: str) -> bool:
        """Tell a job running here to stop after its items in flight (the fast path; the
        store's ``canceling`` status reaches it anyway).

        Returns:
            Whether the job runs here.
        """
        execution = self._running.get(job_id)
        if execution is not None:
            execution.cancel = True
        return execution is not None

    async def run(self, lease: JobLease, row: JobRow) -> JobStatus | None:
        """Run a job whose lease we hold, to its end.

        Args:
            lease: The job's lease (from a claim).
            row: The job as claimed.

        Returns:
            The final status, or None when the lease was lost (another instance owns the
            job now; nothing more was written).
        """
        execution = _Execution(self, lease, row)
        self._running[row.id] = execution
        attributes = {"job.id": row.id, "job.kind": row.kind, "provider": execution.provider}
        try:
            with tracing.span("tokenbroker.job", attributes) as span:
                status = await execution.main()
                span.set("job.status", status.value if status is not None else "lost")
                return status
        finally:
            self._running.pop(row.id, None)
            self.coalescer.forget(row.id)

    async def fail_lost(self, lease: JobLease, row: JobRow) -> bool:
        """End a job whose worker was lost as ``failed`` / ``worker_lost`` (the reaper's path
        for kinds that are not idempotent).

        Returns:
            Whether it was saved (False when fenced out).
        """
        execution = _Execution(self, lease, row)
        error = JobError("worker_lost", "the instance running the job stopped heartbeating")
        return await execution.finish(JobStatus.FAILED, error=error)


class _Execution:
    """One job's run: its state, its saves, its heartbeat."""

    def __init__(self, runner: JobRunner, lease: JobLease, row: JobRow) -> None:
        self.runner = runner
        self.lease = lease
        self.job: Job = job_of(row)
        self.state: Progress = progress_of(row)
        self.kind: JobKind = kind_for(row.kind)
        self.tracker = ProgressTracker(self.kind.plan, floor=self.job.progress)
        self.cancel = row.status == JobStatus.CANCELING.value
        self.lost = False
        self.failed: list[FailedItem] = list(self.job.failed)
        self.ok: list[str] = list(self.state.ok)
        self.lock = asyncio.Lock()
        self.verify_total = self.verified = 0
        self.ctx = KindContext(runner.broker, self.job.params, runner.clock.time())
        provider = self.job.params.get("provider")
        self.provider = provider if isinstance(provider, str) else ""
        self.began = runner.clock.monotonic()
        self.phase: str | None = None
        self.phase_began = self.began

    def _emit_phase(self, phase: str) -> None:
        """Publish JobPhaseChanged when ``phase`` is not the phase the job is in."""
        if phase == self.phase:
            return
        now = self.runner.clock.monotonic()
        previous, took = self.phase, now - self.phase_began
        self.phase, self.phase_began = phase, now
        self.runner.broker.events.emit(
            JobPhaseChanged(
                provider=self.provider,
                job_id=self.job.job_id,
                kind=self.job.kind,
                elapsed=now - self.began,
                phase=phase,
                previous=previous,
                previous_duration=None if previous is None else took,
            )
        )

    def _emit_item(self, item: str, failed: FailedItem | None) -> None:
        """Publish one JobItemFinished for an item that ended (after its retries)."""
        self.runner.broker.events.emit(
            JobItemFinished(
                provider=self.provider,
                job_id=self.job.job_id,
                kind=self.job.kind,
                elapsed=self.runner.clock.monotonic() - self.began,
                phase=self.phase or "",
                item=item,
                outcome="ok" if failed is None else "failed",
                attempts=max(1, self.state.attempts.get(item, 1)),
                reason=None if failed is None else failed.reason,
                retryable=False if failed is None else failed.retryable,
            )
        )

    def should_abort(self) -> bool:
        """True once the job must start no new item: canceled, or the lease was lost."""
        return self.cancel or self.lost

    async def main(self) -> JobStatus | None:
        self.runner.broker.events.emit(
            JobStarted(
                provider=self.provider,
                job_id=self.job.job_id,
                kind=self.job.kind,
                resumed=self.job.started_at is not None or "items" in self.job.params,
            )
        )
        beat = asyncio.create_task(self._heartbeat())
        try:
            return await self._work()
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def _work(self) -> JobStatus | None:
        phases = [p.name for p in self.kind.plan.phases]
        if self.job.started_at is None:
            self.job = dataclasses.replace(self.job, started_at=self.runner.clock.time())
        if self.state.items is None:
            with tracing.span(_PHASE, {"job.phase": phases[0]}):
                await self._progress(phases[0], 0, 1, force=True)
                try:
                    items = await asyncio.to_thread(self.kind.items, self.ctx)
                except Exception as exc:  # the kind could not even list its items
                    lost = JobError("resolve_failed", reason(exc))
                    return JobStatus.FAILED if await self.finish(JobStatus.FAILED, lost) else None
                self.state.items = list(dict.fromkeys(items))
                await self._progress(phases[0], 1, 1, force=True)
        items = self.state.items
        done = set(self.ok) | {f.item for f in self.failed}
        with tracing.span(_PHASE, {"job.phase": phases[1], "job.items": len(items)}):
            await self._progress(phases[1], len(done), len(items), force=True)
            await self._pool([i for i in items if i not in done], self._item)
        if len(phases) > 2 and not self.should_abort():
            self.verify_total, self.verified = len(self.ok), 0
            with tracing.span(_PHASE, {"job.phase": phases[2]}):
                await self._progress(phases[2], 0, self.verify_total, force=True)
                await self._pool(list(self.ok), self._verify)
        if self.lost:
            return None
        ended = len(self.ok) + len(self.failed) == len(items)
        if self.cancel and not ended:
            return JobStatus.CANCELED if await self.finish(JobStatus.CANCELED) else None
        outcome = job_outcome(self._counts())
        error: JobError | None = None
        if outcome is JobStatus.FAILED:
            error = JobError("items_failed", f"all {len(items)} items failed")
        return outcome if await self.finish(outcome, error) else None

    async def _pool(self, items: list[str], work: Callable[[str], Awaitable[None]]) -> None:
        """Run ``work`` over ``items``, ``concurrency`` at a time, none started after abort."""
        queue: Iterator[str] = iter(items)

        async def worker() -> None:
            for item in queue:
                if self.should_abort():
                    return
                await work(item)

        width = max(1, min(self.kind.concurrency_for(self.job.params), len(items)))
        await asyncio.gather(*(worker() for _ in range(width)))

    async def _item(self, item: str) -> None:
        attempt = self.state.attempts.get(item, 0)
        limit = self.runner.policy.max_backoff
        while True:
            attempt += 1
            self.state.attempts[item] = attempt
            hold = await self._cache_hold(item)
            if 0 < hold <= limit and not self.should_abort():
                # A hair past the cache's retry time (it reads its own clock).
                await asyncio.sleep(hold + 0.01)
            try:
                await asyncio.to_thread(self.kind.run_item, self.ctx, item)
            except Exception as exc:
                wait = self.runner.policy.delay(attempt, exc, self.runner.rng)
                if wait is None or hold > limit or self.should_abort():
                    await self._fail(failure(item, exc))
                    return
                logger.info(
                    "job item retried job_id=%s item=%s attempt=%d", self.job.job_id, item, attempt
                )
                await asyncio.sleep(wait)
                continue
            self.ok.append(item)
            self._emit_item(item, None)
            break
        await self._progress(self.kind.plan.phases[1].name, *self._done_of_phase())

    async def _cache_hold(self, item: str) -> float:
        """How long the token cache still serves ``item``'s remembered failure instead of
        asking the provider (:meth:`~tokenbroker.jobs.kinds.JobKind.retry_wait`); 0.0 when
        it would ask now, or when the key no longer resolves (the attempt then says why)."""
        try:
            return await asyncio.to_thread(self.kind.retry_wait, self.ctx, item)
        except Exception:
            return 0.0

    async def _verify(self, item: str) -> None:
        try:
            await asyncio.to_thread(self.kind.verify_item, self.ctx, item)
        except Exception as exc:
            self.ok.remove(item)
            await self._fail(failure(item, exc))
            return
        self.verified += 1
        await self._progress(self.kind.plan.phases[2].name, self.verified, self.verify_total)

    def _done_of_phase(self) -> tuple[int, int]:
        total = len(self.state.items or [])
        return len(self.ok) + len(self.failed), total

    def _counts(self) -> ItemCounts:
        return ItemCounts(len(self.state.items or []), len(self.ok), len(self.failed))

    async def _fail(self, item: FailedItem) -> None:
        self.failed.append(item)
        self._emit_item(item.item, item)
        event = ItemFailed(
            job_id=self.job.job_id, item=item.item, reason=item.reason, retryable=item.retryable
        )
        logger.info(
            "job item failed job_id=%s item=%s retryable=%s",
            self.job.job_id,
            item.item,
            item.retryable,
        )
        await self._save(JobStatus.RUNNING, [event])

    async def _progress(self, phase: str, done: int, total: int, *, force: bool = False) -> None:
        """Move the tracker; save with a ``phase_update`` when the coalescer lets it out."""
        self._emit_phase(phase)
        progress = min(self.tracker.update(phase, done, total), 99.99)
        self.job = dataclasses.replace(self.job, phase=phase, progress=progress)
        update = PhaseUpdate(
            job_id=self.job.job_id,
            phase=phase,
            progress=progress,
            items=self._counts(),
            ts=self.runner.clock.time(),
        )
        passed = self.runner.coalescer.offer(self.job.job_id, update, phase=phase)
        if passed is not None or force:
            await self._save(JobStatus.RUNNING, [update])

    async def finish(self, status: JobStatus, error: JobError | None = None) -> bool:
        """Save the final status with its final event (the store frees the lease)."""
        now = self.runner.clock.time()
        event: JobEvent
        if status is JobStatus.CANCELED:
            event = Canceled(job_id=self.job.job_id, ts=now)
        elif status is JobStatus.FAILED:
            event = Failed(job_id=self.job.job_id, error=error or JobError("failed", "failed"))
        else:
            event = Completed(job_id=self.job.job_id, status=status)
            self.tracker.finish()
        progress = 100.0 if status in (JobStatus.DONE, JobStatus.PARTIAL) else self.job.progress
        self.job = dataclasses.replace(self.job, error=error, progress=progress)
        logger.info(
            "job ended job_id=%s kind=%s status=%s", self.job.job_id, self.job.kind, status.value
        )
        saved = await self._save(status, [event])
        if saved:
            now_mono = self.runner.clock.monotonic()
            self.runner.broker.events.emit(
                JobFinished(
                    provider=self.provider,
                    job_id=self.job.job_id,
                    kind=self.job.kind,
                    elapsed=now_mono - self.began,
                    status=status.value,
                    phase=self.phase or self.job.phase,
                    phase_duration=None if self.phase is None else now_mono - self.phase_began,
                    ok=len(self.ok),
                    failed=len(self.failed),
                    error_type=None if error is None else error.type,
                )
            )
        return saved

    async def _save(self, status: JobStatus, events: list[JobEvent]) -> bool:
        """Write the job (fenced) with ``events``; notes a cancel request or a lost lease."""
        if self.lost:
            return False
        async with self.lock:
            now = self.runner.clock.time()
            job = dataclasses.replace(
                self.job,
                items=self._counts(),
                failed=tuple(self.failed),
                updated_at=now,
                metrics={"attempts": float(sum(self.state.attempts.values()))},
            )
            if status.final:
                job = dataclasses.replace(job, finished_at=now, status=status)
            self.job = job
            self.state.ok = list(self.ok)
            document = encode(job, self.state)
            data: list[NewJobEvent] = [event_data(e) for e in events]
            store = self.runner.broker.store
            row = await asyncio.to_thread(store.save_job, self.lease, status.value, document, data)
        if row is None:
            self.lost = True
            logger.warning("job lease lost job_id=%s", self.job.job_id)
            return False
        if row.status == JobStatus.CANCELING.value:
            self.cancel = True
        self.runner.notify(self.job.job_id)
        return True

    async def _heartbeat(self) -> None:
        settings = self.runner.settings
        store = self.runner.broker.store
        while not self.lost:
            await asyncio.sleep(settings.heartbeat_seconds)
            row = await asyncio.to_thread(store.heartbeat_job, self.lease, settings.lease_seconds)
            if row is None:
                self.lost = True
                return
            if row.status == JobStatus.CANCELING.value:
                self.cancel = True
            held = self.runner.coalescer.flush(self.job.job_id)
            if held is not None:
                await self._save(JobStatus.RUNNING, [held])
