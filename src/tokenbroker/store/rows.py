"""The store's rows, as the rest of tokenbroker sees them (decrypted, redacted in reprs)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.secret import Secret
from ..core.token import Token

__all__ = [
    "ACTIVE_JOB_STATUSES",
    "FINAL_JOB_STATUSES",
    "Attempt",
    "CredentialRow",
    "JobEventRow",
    "JobLease",
    "JobPage",
    "JobRow",
    "Lease",
    "NewJobEvent",
    "StoredToken",
]


@dataclass(frozen=True, slots=True, repr=False)
class StoredToken:
    """A stored access token.

    Attributes:
        token: The token as consumers get it.
        lifetime: Its full lifetime in seconds.
        obtained_at: Wall-clock time it was requested.
        fingerprint: Fingerprint of the settings it was issued under.
    """

    token: Token
    lifetime: float
    obtained_at: float
    fingerprint: str

    def __repr__(self) -> str:
        return f"StoredToken(expires_at={self.token.expires_at:.0f}, lifetime={self.lifetime})"


@dataclass(frozen=True, slots=True, repr=False)
class CredentialRow:
    """One credential row, decrypted.

    Attributes:
        id: Row id (see the broker's key scheme).
        provider: Provider name.
        token: The stored access token, if any.
        refresh_token: The stored refresh token, if any.
        rt_version: Increments with every applied refresh.
        seed_digest: SHA-256 of the configured seed the refresh token chain started from.
        state: ``active``, ``refreshing``, ``in_doubt`` or ``reauthorization_required``.
        last_error: Class name of the last failure.
        last_refresh: Wall-clock time of the last applied token.
        lease_owner: Who holds the lease, if anyone.
        lease_fence: The fence counter.
        lease_expires_at: Database-clock expiry of the lease.
    """

    id: str
    provider: str
    token: StoredToken | None
    refresh_token: Secret | None
    rt_version: int
    seed_digest: str | None
    state: str
    last_error: str | None
    last_refresh: float | None
    lease_owner: str | None
    lease_fence: int
    lease_expires_at: float | None

    def __repr__(self) -> str:
        return f"CredentialRow(id={self.id!r}, state={self.state!r}, rt_version={self.rt_version})"


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lease: proof of the right to refresh one credential.

    Attributes:
        id: The credential row.
        owner: Our owner id.
        fence: The fence value our writes must carry.
        rt_version: The refresh-token version when the lease was taken.
        expires_at: Database-clock expiry.
    """

    id: str
    owner: str
    fence: int
    rt_version: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Attempt:
    """A recorded refresh attempt.

    Attributes:
        id: Attempt id.
        from_version: The refresh-token version it presented.
        fence: The fence it ran under.
        started_at: Database-clock start.
        status: ``intent``, ``in_doubt``, ``succeeded``, ``orphaned``, ``failed``, ``superseded``.
        recovery: Whether it was a recovery of an earlier in-doubt attempt.
    """

    id: int
    from_version: int
    fence: int
    started_at: float
    status: str
    recovery: bool


#: Job statuses in which a job holds its idempotency key (a repeated start returns it).
ACTIVE_JOB_STATUSES = ("queued", "running", "canceling")
#: Job statuses a job never leaves.
FINAL_JOB_STATUSES = ("done", "partial", "failed", "canceled")


@dataclass(frozen=True, slots=True)
class JobRow:
    """One stored job, in store terms (the jobs layer turns it into a ``Job``).

    Attributes:
        id: The job id.
        kind: The job kind.
        status: ``queued``, ``running``, ``canceling``, or a final status
            (:data:`FINAL_JOB_STATUSES`).
        requested_by: The consumer that started it.
        idempotency_key: Kind + canonical params digest.
        document: The rest of the job (params, phase, progress, items, failures, error,
            metrics, times), as JSON text owned by the jobs layer; never a secret.
        created_at: When it was queued, on the caller's clock.
        finished_at: When it reached a final status, on the store's clock (prune uses it).
        owner: The instance holding its lease, None when nobody does.
        fence: Bumped by every claim; a save must carry the current one.
        lease_expires_at: Store-clock expiry of the owner's lease.
        heartbeat_at: Store-clock time of the last claim or heartbeat.
        last_event: The sequence number of its newest stored event (0: none yet).
        cursor: Opaque position for :meth:`~.base.JobStore.jobs` pagination.
    """

    id: str
    kind: str
    status: str
    requested_by: str
    idempotency_key: str
    document: str
    created_at: float
    finished_at: float | None
    owner: str | None
    fence: int
    lease_expires_at: float | None
    heartbeat_at: float | None
    last_event: int
    cursor: str

    @property
    def final(self) -> bool:
        """Whether the job has reached a final status."""
        return self.status in FINAL_JOB_STATUSES


@dataclass(frozen=True, slots=True)
class JobLease:
    """A held job lease: proof of the right to run (and write) one job.

    Attributes:
        job_id: The job.
        owner: Our owner id (the instance).
        fence: The fence value every save and append must carry.
        expires_at: Store-clock expiry, moved on by each heartbeat.
    """

    job_id: str
    owner: str
    fence: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class JobEventRow:
    """One stored job event.

    Attributes:
        job_id: The job.
        seq: 1, 2, 3, … per job without gaps.
        name: The event name (``phase_update``, ``completed`` …).
        data: Its JSON payload, as text.
        at: Store-clock time it was stored.
    """

    job_id: str
    seq: int
    name: str
    data: str
    at: float


#: An event to append: ``(name, JSON data)``; the store numbers it.
NewJobEvent = tuple[str, str]


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of :meth:`~.base.JobStore.jobs`.

    Attributes:
        rows: The jobs on this page.
        cursor: Pass it back for the next page; None when this is the last.
    """

    rows: list[JobRow]
    cursor: str | None
