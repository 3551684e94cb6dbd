"""The life of an ``authorize`` job: parked while a person signs in, finished by the callback.

::

    start ──► park: running, phase waiting_for_user, lease released, authorize_url shown
                │
                ├─ GET /v1/oauth/callback?state=…  (any process on the store)
                │    claim the job (one winner) ─► spend the state ─► iss (RFC 9207) ─►
                │    error=… ? ─► exchanging_code ─► verifying ─► done
                │
                └─ the state expires ─► the reaper ends it failed / expired

A parked job holds no lease, so the reaper sees it in ``expired_jobs``; it leaves it be
while its state is valid (it is waiting for a person, not stuck). The callback takes the
job over with :meth:`~tokenbroker.store.base.JobStore.claim_job` — atomic and fenced, so of
two callbacks with one state exactly one proceeds — and its first save removes the state's
digest from the job: a replay finds no job and gets 400. The state is kept only as its
SHA-256; the verifier and the URL are sealed (:mod:`tokenbroker.engine.reauthorization`).
Every failure ends the job ``failed`` with a snake-case ``error.type`` (``expired``,
``possible_mix_up``, the provider's error code such as ``access_denied``,
``exchange_failed``, ``no_refresh_token``) and changes no credential.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import JobsSettings
from ..core.clock import Clock
from ..core.events import JobFinished, JobPhaseChanged, JobStarted
from ..engine.broker import Broker
from ..engine.reauthorization import AuthorizationError, Reauthorizer
from ..errors import StoreError
from ..store import JobLease, JobRow
from .document import Progress, encode, event_data, job_of
from .events import Canceled, Completed, Failed, JobEvent, PhaseUpdate
from .model import ItemCounts, Job, JobError, JobStatus

__all__ = ["ITEM_PREFIX", "KIND", "Authorizations", "CallbackOutcome"]

logger = logging.getLogger("tokenbroker.jobs")

#: The kind these jobs have.
KIND = "authorize"
#: How ``rotate_key`` names an authorize job whose sealed record it re-seals.
ITEM_PREFIX = "authorize_job/"
_STATE_MAX = 512
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
_PROGRESS = {"waiting_for_user": 0.0, "exchanging_code": 33.33, "verifying": 66.67}


@dataclass(frozen=True, slots=True)
class CallbackOutcome:
    """What the callback page says: ``ok`` (connected) or not, a secret-free message, the
    HTTP status, and the job (None when no job matched the state)."""

    ok: bool
    message: str
    status: int
    job_id: str | None = None


def record_of(row: JobRow) -> dict[str, Any]:
    """The authorization record kept in an authorize job's document (empty if none)."""
    record = json.loads(row.document).get("authorization")
    return dict(record) if isinstance(record, dict) else {}


class Authorizations:
    """Parks, finishes and expires ``authorize`` jobs of one store (any process).

    Args:
        broker: The broker (its store holds the jobs and the credentials).
        settings: The ``jobs:`` settings.
        clock: Where job times come from.
        owner: This instance's owner id in job leases.
        notify: Called with a job id after each write (wakes this process's readers).
    """

    def __init__(
        self,
        broker: Broker,
        settings: JobsSettings,
        clock: Clock,
        owner: str,
        notify: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        self.broker = broker
        self.store = broker.store
        self.settings = settings
        self.clock = clock
        self.owner = owner
        self.notify = notify
        self.reauthorizer = Reauthorizer(broker)

    def __repr__(self) -> str:
        return f"Authorizations(owner={self.owner!r})"

    @property
    def _ttl(self) -> float:
        """The callback's lease: the exchange, the fenced write and the check, with room."""
        return 4 * self.broker.settings.defaults.deadline_seconds + 10

    # -- start ---------------------------------------------------------------------------

    def park(self, row: JobRow) -> JobRow:
        """Move a queued authorize job to ``waiting_for_user`` with a fresh state, and release
        its lease; a job that cannot start (discovery failed) ends ``failed`` instead.

        Returns:
            The row afterwards (unchanged when another instance claimed it first).
        """
        lease = self.store.claim_job(row.id, self.owner, self._ttl)
        if lease is None:
            return self.store.job(row.id) or row
        job = job_of(row)
        job = dataclasses.replace(job, started_at=self.clock.time())
        try:
            record = self.reauthorizer.begin(job.params["provider"], job.job_id)
        except AuthorizationError as exc:
            self._finish(lease, job, {}, JobStatus.FAILED, JobError(exc.type, str(exc)))
            return self.store.job(row.id) or row
        self.broker.events.emit(
            JobStarted(provider=job.params["provider"], job_id=job.job_id, kind=KIND)
        )
        self._save(lease, job, record, "waiting_for_user")
        self.store.heartbeat_job(lease, -1.0)  # release: any process may take the callback
        logger.info("authorization waiting for the user job_id=%s", row.id)
        return self.store.job(row.id) or row

    def authorize_url(self, row: JobRow) -> str | None:
        """The URL to send the person to, while the job waits for them (else None)."""
        if row.kind != KIND or row.status != JobStatus.RUNNING.value:
            return None
        record = record_of(row)
        if "state_sha256" not in record:
            return None
        return self.reauthorizer.authorize_url(row.id, record)

    # -- the callback --------------------------------------------------------------------

    def _find(self, state: str) -> JobRow | None:
        active = [JobStatus.RUNNING.value, JobStatus.CANCELING.value]
        rows = self.store.jobs(statuses=active, kind=KIND, limit=1000).rows
        return next((r for r in rows if self.reauthorizer.state_matches(record_of(r), state)), None)

    def complete(self, query: Mapping[str, str]) -> CallbackOutcome:
        """Answer ``GET /v1/oauth/callback`` (see the module docstring).

        Args:
            query: The callback's query parameters (first value of each).

        Returns:
            The outcome for the page.
        """
        state = query.get("state", "")
        if not state or len(state) > _STATE_MAX:
            return CallbackOutcome(False, "The answer has no valid state.", 400)
        row = self._find(state)
        lease = None if row is None else self._claim(row.id)
        fresh = None if lease is None else self.store.job(lease.job_id)
        if lease is None or fresh is None:
            return CallbackOutcome(False, "Unknown, used or expired authorisation.", 400)
        record = record_of(fresh)
        if not self.reauthorizer.state_matches(record, state):
            self.store.heartbeat_job(lease, -1.0)
            return CallbackOutcome(False, "Unknown, used or expired authorisation.", 400)
        job = job_of(fresh)
        if fresh.status == JobStatus.CANCELING.value:
            self._finish(lease, job, {}, JobStatus.CANCELED)
            return CallbackOutcome(False, "The authorisation was canceled.", 400, job.job_id)
        if self.store.now() >= float(record.get("expires_at", 0)):
            error = JobError("expired", "the authorisation expired before the answer came")
            self._finish(lease, job, {}, JobStatus.FAILED, error)
            return CallbackOutcome(False, "The authorisation expired.", 400, job.job_id)
        spent = {k: v for k, v in record.items() if k not in ("state_sha256", "url_sealed")}
        saved = self._save(lease, job, spent, "exchanging_code")
        if saved is None:
            return CallbackOutcome(False, "Unknown, used or expired authorisation.", 400)
        job = saved
        try:
            self._answer(job, spent, query)
        except AuthorizationError as exc:
            logger.warning("authorization failed job_id=%s type=%s", job.job_id, exc.type)
            self._finish(lease, job, {}, JobStatus.FAILED, JobError(exc.type, str(exc)))
            return CallbackOutcome(False, str(exc), 400, job.job_id)
        try:
            if (saved := self._save(lease, job, {}, "verifying")) is not None:
                job = saved
                self.reauthorizer.verify(job.params["provider"], None)
        except AuthorizationError as exc:
            self._finish(lease, job, {}, JobStatus.FAILED, JobError(exc.type, str(exc)))
            return CallbackOutcome(False, str(exc), 400, job.job_id)
        self._finish(lease, job, {}, JobStatus.DONE)
        logger.info("authorization done job_id=%s", job.job_id)
        return CallbackOutcome(True, "Connected. You can close this window.", 200, job.job_id)

    def _claim(self, job_id: str, wait: float = 2.0) -> JobLease | None:
        """Take a parked job's lease; while someone else holds it and the job still waits
        for its answer (``rotate_key`` re-sealing it), retry for up to ``wait`` seconds."""
        give_up = time.monotonic() + wait
        while (lease := self.store.claim_job(job_id, self.owner, self._ttl)) is None:
            row = self.store.job(job_id)
            if row is None or "state_sha256" not in record_of(row):
                return None
            if row.status not in (JobStatus.RUNNING.value, JobStatus.CANCELING.value):
                return None
            if time.monotonic() > give_up:
                return None
            time.sleep(0.05)
        return lease

    def _answer(self, job: Job, record: Mapping[str, Any], query: Mapping[str, str]) -> None:
        """Check the answer (RFC 9207 first, then an error), exchange the code and store the
        new tokens.

        Raises:
            AuthorizationError: Why the job fails.
        """
        provider = job.params["provider"]
        iss, issuer = query.get("iss"), record.get("issuer")
        if (record.get("iss_required") and iss is None) or (
            iss is not None and issuer is not None and iss != issuer
        ):
            raise AuthorizationError(
                "possible_mix_up",
                "possible mix-up: the answer's iss is not the provider's issuer (RFC 9207)",
            )
        error = query.get("error")
        if error is not None:
            code = error if _ERROR_CODE.match(error) else "authorization_error"
            raise AuthorizationError(code, f"the provider answered error={code}")
        code_value = query.get("code", "")
        if not code_value or len(code_value) > 4096:
            raise AuthorizationError("invalid_callback", "the answer has no code")
        response = self.reauthorizer.exchange(provider, job.job_id, record, code_value)
        self.reauthorizer.install(provider, None, response)

    # -- key rotation --------------------------------------------------------------------

    def stale(self) -> list[str]:
        """Authorize jobs in flight whose sealed verifier or URL is under an old key, as
        ``authorize_job/ID`` items of the ``rotate_key`` job."""
        active = [JobStatus.RUNNING.value, JobStatus.CANCELING.value]
        rows = self.store.jobs(statuses=active, kind=KIND, limit=1000).rows
        return sorted(
            ITEM_PREFIX + row.id for row in rows if self.reauthorizer.stale(record_of(row))
        )

    def reseal(self, item: str, wait: float = 5.0) -> None:
        """Re-seal one ``authorize_job/ID`` item under the primary key: take the parked
        job's lease, rewrite its record, release the lease (its phase and state unchanged).
        A job that ended or left ``waiting_for_user`` meanwhile needs nothing.

        Raises:
            StoreError: The job's lease stayed held for ``wait`` seconds.
        """
        job_id = item.removeprefix(ITEM_PREFIX)
        give_up = time.monotonic() + wait
        while (lease := self.store.claim_job(job_id, self.owner, self._ttl)) is None:
            row = self.store.job(job_id)
            if row is None or not self.reauthorizer.stale(record_of(row)):
                return
            if time.monotonic() > give_up:
                raise StoreError("an authorize job stayed busy during key rotation")
            time.sleep(0.05)
        try:
            row = self.store.job(job_id)
            if row is None or not self.reauthorizer.stale(record_of(row)):
                return
            doc = json.loads(row.document)
            doc["authorization"] = self.reauthorizer.reseal(job_id, record_of(row))
            document = json.dumps(doc, separators=(",", ":"), allow_nan=False)
            self.store.save_job(lease, row.status, document)
        finally:
            self.store.heartbeat_job(lease, -1.0)  # parked again: any process may finish it

    # -- expiry --------------------------------------------------------------------------

    def reap(self, row: JobRow) -> bool:
        """The reaper's call for an authorize job whose lease expired: leave a waiting job
        with a valid state; end it ``failed`` / ``expired`` once the state expired,
        ``canceled`` when cancel was asked, and ``failed`` / ``worker_lost`` when the
        process finishing its callback died.

        Returns:
            Whether this call ended the job.
        """
        record = record_of(row)
        waiting = "state_sha256" in record
        valid = self.store.now() < float(record.get("expires_at", 0))
        if waiting and valid and row.status == JobStatus.RUNNING.value:
            return False
        lease = self.store.claim_job(row.id, self.owner, self._ttl)
        if lease is None:
            return False
        job = job_of(self.store.job(row.id) or row)
        if row.status == JobStatus.CANCELING.value:
            return self._finish(lease, job, {}, JobStatus.CANCELED)
        if waiting:
            error = JobError("expired", "nobody completed the authorisation in time")
        else:
            error = JobError("worker_lost", "the instance finishing the callback stopped")
        logger.warning("authorization ended job_id=%s type=%s", row.id, error.type)
        return self._finish(lease, job, {}, JobStatus.FAILED, error)

    # -- saving --------------------------------------------------------------------------

    def _document(self, job: Job, record: Mapping[str, Any]) -> str:
        doc = json.loads(encode(job, Progress(items=[job.params["provider"]])))
        if record:
            doc["authorization"] = dict(record)
        return json.dumps(doc, separators=(",", ":"), allow_nan=False)

    def _save(self, lease: JobLease, job: Job, record: Mapping[str, Any], phase: str) -> Job | None:
        """Move ``job`` to ``phase``; the job afterwards, or None when the lease was lost."""
        now = self.clock.time()
        moved = dataclasses.replace(
            job, phase=phase, progress=_PROGRESS[phase], updated_at=now, items=ItemCounts(1)
        )
        update = PhaseUpdate(
            job_id=job.job_id, phase=phase, progress=moved.progress, items=moved.items, ts=now
        )
        if not self._write(lease, moved, record, JobStatus.RUNNING, update):
            return None
        # Like the runner: the metrics' running-jobs gauge and phase durations, the logs.
        began = job.started_at or job.created_at
        self.broker.events.emit(
            JobPhaseChanged(
                provider=str(job.params.get("provider", "")),
                job_id=job.job_id,
                kind=KIND,
                elapsed=max(0.0, now - began),
                phase=phase,
                previous=job.phase,
                previous_duration=(
                    None if job.phase is None else max(0.0, now - (job.updated_at or began))
                ),
            )
        )
        return moved

    def _finish(
        self,
        lease: JobLease,
        job: Job,
        record: Mapping[str, Any],
        status: JobStatus,
        error: JobError | None = None,
    ) -> bool:
        now = self.clock.time()
        event: JobEvent
        if status is JobStatus.DONE:
            event = Completed(job_id=job.job_id, status=status)
            counts = ItemCounts(1, ok=1)
        elif status is JobStatus.CANCELED:
            event, counts = Canceled(job_id=job.job_id, ts=now), ItemCounts(1)
        else:
            assert error is not None
            event, counts = Failed(job_id=job.job_id, error=error), ItemCounts(1, failed=1)
        ended = dataclasses.replace(
            job,
            status=status,
            error=error,
            items=counts,
            progress=100.0 if status is JobStatus.DONE else job.progress,
            updated_at=now,
            finished_at=now,
        )
        if not self._write(lease, ended, record, status, event):
            return False
        self.broker.events.emit(
            JobFinished(
                provider=str(job.params.get("provider", "")),
                job_id=job.job_id,
                kind=KIND,
                elapsed=max(0.0, now - (job.started_at or job.created_at)),
                status=status.value,
                phase=job.phase,
                ok=counts.ok,
                failed=counts.failed,
                error_type=None if error is None else error.type,
            )
        )
        return True

    def _write(
        self,
        lease: JobLease,
        job: Job,
        record: Mapping[str, Any],
        status: JobStatus,
        event: JobEvent,
    ) -> bool:
        document = self._document(job, record)
        saved = self.store.save_job(lease, status.value, document, [event_data(event)])
        self.notify(job.job_id)
        return saved is not None
