"""The store protocols: what every backend provides and what engine code may rely on.

Correctness lives here (``reference/refresh-protocol.md``). A credential row is both the
lock and the protected resource: :meth:`CredentialStore.acquire` takes a lease on the
*store's* clock and bumps a fence counter; every write that matters carries the fence
(and, for refresh tokens, the refresh-token version) and changes nothing when either
moved on. So a holder that lost its lease — paused, partitioned, or simply slow — can
never overwrite a newer token. The commit condition is the fence, not the clock: a
holder that overran its lease while nobody took over still saves its reply.

Every secret (access token, refresh token, raw reply, signing key) is persisted only as
ciphertext bound to its row, column and version (:mod:`.sealing`). Any backend must pass
:mod:`tokenbroker.testing.store_conformance` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..core.secret import Secret
from .rows import (
    Attempt,
    CredentialRow,
    JobEventRow,
    JobLease,
    JobPage,
    JobRow,
    Lease,
    NewJobEvent,
    StoredToken,
)

__all__ = [
    "ConsumerStore",
    "CredentialStore",
    "JobStore",
    "RawState",
    "SigningKeyStore",
    "Store",
]


class CredentialStore(Protocol):
    """Credentials, their fenced leases and their write-ahead refresh attempts."""

    def now(self) -> float:
        """The store's clock (the one leases expire by), Unix seconds."""
        ...  # pragma: no cover

    def load(self, row_id: str) -> CredentialRow | None:
        """Read and decrypt one credential row.

        Returns:
            The row, or None when it does not exist.

        Raises:
            StoreCorruptError: A ciphertext fails its integrity check (or belongs elsewhere).
        """
        ...  # pragma: no cover

    def states(self) -> list[dict[str, Any]]:
        """Every credential's non-secret columns (``id``, ``provider``, ``scope``,
        ``account``, ``state``, ``at_expires_at``, ``last_refresh``, ``last_error``,
        ``rt_version``, ``lease_owner``, ``lease_expires_at``), ordered by provider, account,
        scope, id. Needs no key; holds no secret."""
        ...  # pragma: no cover

    def attempts(self, row_id: str) -> list[Attempt]:
        """Every recorded refresh attempt of a credential, oldest first."""
        ...  # pragma: no cover

    def open_attempts(self, row_id: str) -> list[Attempt]:
        """Attempts in ``intent`` or ``in_doubt``: possibly sent, no stored outcome."""
        ...  # pragma: no cover

    def acquire(
        self,
        row_id: str,
        provider: str,
        owner: str,
        ttl: float,
        *,
        steal_from: str | None = None,
        scope: str | None = None,
        account: str | None = None,
    ) -> Lease | None:
        """Take the lease if it is free, expired on the store's clock, or held by
        ``steal_from``; creates the row if needed. Atomic: at most one caller wins, and every
        win increments the fence, so a takeover fences out the previous holder.

        Args:
            row_id: The credential row.
            provider: Its provider's name.
            owner: Our owner id.
            ttl: Lease time-to-live, seconds on the store's clock.
            steal_from: A holder whose lease we may take over (its process is gone).
            scope: The row's canonical scope (plaintext, for ``status``); None keeps it.
            account: The row's account name, likewise.

        Returns:
            The lease (its fence and the refresh-token version it saw), or None when held.
        """
        ...  # pragma: no cover

    def release(self, lease: Lease) -> None:
        """Give the lease back; a no-op when the fence or owner no longer match."""
        ...  # pragma: no cover

    def begin_attempt(self, lease: Lease, *, recovery: bool = False) -> int | None:
        """Write the intent record (write-ahead, step 3) and mark the row ``refreshing``,
        in one transaction, only if the fence and refresh-token version still match.

        Returns:
            The attempt id (never reused), or None when fenced out (nothing written).
        """
        ...  # pragma: no cover

    def close_attempts(self, lease: Lease, ids: list[int], status: str) -> bool:
        """Resolve earlier open attempts (e.g. ``superseded``), only under a current fence.

        Returns:
            Whether the fence still matched; a fenced-out holder changes nothing.
        """
        ...  # pragma: no cover

    def finish_attempt(
        self,
        lease: Lease,
        attempt_id: int | None,
        *,
        status: str,
        state: str,
        error: str | None,
        raw: bytes | None = None,
    ) -> None:
        """Record an attempt's outcome (its raw reply sealed) and, fenced, the row's state and
        last error: a stale fence leaves the credential row untouched."""
        ...  # pragma: no cover

    def commit(
        self,
        lease: Lease,
        attempt_id: int | None,
        token: StoredToken,
        *,
        refresh_token: Secret | None = None,
        seed_digest: str | None = None,
        raw: bytes | None = None,
    ) -> bool:
        """Store a reply and apply its tokens in one transaction (step 6).

        The raw reply is always kept, sealed, on the attempt (``received``). The tokens are
        applied only when the fence **and** the refresh-token version still match; then the
        version moves on by one when a refresh token is given and the attempt is
        ``succeeded``; otherwise nothing of the row changes and the attempt is ``orphaned``.

        Args:
            lease: The lease the request was sent under.
            attempt_id: The intent record, for refresh-token credentials.
            token: The new access token.
            refresh_token: The refresh token to keep (new, or the one presented).
            seed_digest: Digest of the configured seed this chain descends from.
            raw: The provider's raw reply.

        Returns:
            True when applied, False when fenced out (orphaned).
        """
        ...  # pragma: no cover

    def set_state(self, lease: Lease, state: str, error: str | None = None) -> bool:
        """Set the row's state and last error, fenced.

        Returns:
            Whether the fence still matched.
        """
        ...  # pragma: no cover

    def reseed(self, lease: Lease, seed: Secret, digest: str) -> Lease | None:
        """Replace the refresh token with a newly configured seed at version + 1, drop the
        access token and supersede open attempts — only when the fence and version match.

        Returns:
            The lease carrying the new version, or None when fenced out.
        """
        ...  # pragma: no cover


class ConsumerStore(Protocol):
    """Consumers added at run time (``tokenbroker consumers add``): digests, never keys."""

    def add_consumer(self, name: str, key_sha256: str, allow: list[str]) -> None:
        """Store a consumer and change :meth:`consumers_version`.

        Raises:
            StoreError: The name or key digest exists already (nothing changes).
        """
        ...  # pragma: no cover

    def remove_consumer(self, name: str) -> bool:
        """Delete a consumer (and change :meth:`consumers_version` when it existed).

        Returns:
            Whether it existed.
        """
        ...  # pragma: no cover

    def consumers(self) -> list[tuple[str, str, list[str]]]:
        """Every stored consumer as ``(name, key digest, allow rules)``, by name."""
        ...  # pragma: no cover

    def consumers_version(self) -> str:
        """A marker that changes with every add or remove, as seen by every process on the
        same store (servers poll it); equal values mean the same consumers."""
        ...  # pragma: no cover


class SigningKeyStore(Protocol):
    """The delegation signing keys, sealed."""

    def signing_keys(self, algorithm: str) -> list[tuple[str, bytes]]:
        """The keys for ``algorithm`` as ``(kid, private PEM)``, newest first."""
        ...  # pragma: no cover

    def add_signing_key(self, kid: str, algorithm: str, private_pem: bytes) -> None:
        """Store a signing key, sealed; a no-op when ``kid`` exists."""
        ...  # pragma: no cover


class JobStore(Protocol):
    """Jobs, their fenced leases, their events and schedule claims (issue 16).

    A job row is both the lock and the record, like a credential row: :meth:`claim_job`
    takes its lease on the store's clock and bumps its fence; :meth:`save_job`,
    :meth:`heartbeat_job` and :meth:`append_job_event` carry the fence and change nothing
    for a stale owner. A job's events are numbered 1, 2, 3, … without gaps, in the same
    transaction as the write that adds them. Nothing secret is ever stored here: params
    name providers, never tokens. Statuses are the words of
    :data:`~tokenbroker.store.rows.ACTIVE_JOB_STATUSES` and ``FINAL_JOB_STATUSES``; the
    store checks only what fencing, idempotency and cancellation need.
    """

    def add_job(
        self,
        job_id: str,
        kind: str,
        idempotency_key: str,
        requested_by: str,
        document: str,
        created_at: float,
    ) -> tuple[JobRow, bool]:
        """Queue a job unless an active one (queued, running or canceling) has the same
        idempotency key; atomic, so of N racing callers exactly one adds.

        Returns:
            ``(the new row, False)``, or ``(the active job with that key, True)``.

        Raises:
            StoreError: ``job_id`` exists already (nothing changes).
        """
        ...  # pragma: no cover

    def job(self, job_id: str) -> JobRow | None:
        """One job, or None for an unknown id (never a default)."""
        ...  # pragma: no cover

    def jobs(
        self,
        *,
        statuses: Sequence[str] | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        oldest_first: bool = False,
    ) -> JobPage:
        """Jobs newest first (or oldest first), filtered, one page at a time.

        Args:
            statuses: Only these statuses (None: all).
            kind: Only this kind (None: all).
            limit: At most this many rows (at least 1).
            cursor: From the previous page's :attr:`JobPage.cursor`; the page goes on after
                it. A job added meanwhile never shifts a page.
            oldest_first: Order oldest first (the runner's queue order).

        Returns:
            The page and the cursor of the next one (None when no more rows).

        Raises:
            ValueError: A malformed cursor or a limit below 1.
        """
        ...  # pragma: no cover

    def claim_job(self, job_id: str, owner: str, ttl: float) -> JobLease | None:
        """Take a job's lease on the store's clock, bumping its fence: from ``queued``
        (which becomes ``running``), or from ``running``/``canceling`` whose lease has
        expired (the reaper's takeover; the status stays). Atomic: one caller wins.

        Returns:
            The lease, or None (unknown job, final, or held by a live lease).
        """
        ...  # pragma: no cover

    def heartbeat_job(self, lease: JobLease, ttl: float) -> JobRow | None:
        """Renew the lease to ``now + ttl`` on the store's clock, fenced.

        Returns:
            The row after renewal (its status shows a cancel request), or None when the
            lease was lost (fenced out: nothing changes).
        """
        ...  # pragma: no cover

    def save_job(
        self,
        lease: JobLease,
        status: str,
        document: str,
        events: Sequence[NewJobEvent] = (),
    ) -> JobRow | None:
        """Write a job's status and document and append ``events``, in one transaction,
        only while ``lease`` is current. A save never undoes a cancel request: ``running``
        over ``canceling`` keeps ``canceling``. A final status stamps ``finished_at`` (store
        clock) and frees the lease; ``queued`` frees it too (the job waits to be claimed).

        Returns:
            The row as saved, or None when fenced out (nothing written, no event added).
        """
        ...  # pragma: no cover

    def append_job_event(
        self, job_id: str, name: str, data: str, *, lease: JobLease | None = None
    ) -> int | None:
        """Append one event to a job: under its current lease, or, with ``lease`` None,
        only while nobody holds the job (queued or finished).

        Args:
            job_id: The job.
            name: Event name.
            data: JSON payload.
            lease: The owner's lease; None for an unowned job.

        Returns:
            The event's sequence number, or None when refused (fenced out, held by
            someone, or unknown job): nothing is written.
        """
        ...  # pragma: no cover

    def cancel_job(self, job_id: str, event: NewJobEvent) -> JobRow | None:
        """Ask a job to stop: ``queued`` becomes ``canceled`` at once (finished, with
        ``event`` appended as its final event); ``running`` becomes ``canceling`` (its
        owner sees it at the next heartbeat or save and stops); ``canceling`` and final
        jobs are left as they are.

        Returns:
            The row afterwards, or None for an unknown id.
        """
        ...  # pragma: no cover

    def expired_jobs(self) -> list[JobRow]:
        """Jobs ``running`` or ``canceling`` whose lease expired on the store's clock
        (their owner stopped heartbeating), oldest first."""
        ...  # pragma: no cover

    def job_events(
        self, job_id: str, after: int = 0, limit: int | None = None
    ) -> list[JobEventRow]:
        """A job's events with ``seq > after``, in order (at most ``limit``); empty for
        an unknown job."""
        ...  # pragma: no cover

    def prune_jobs(self, ttl: float) -> int:
        """Delete finished jobs (with their events) whose ``finished_at`` is more than
        ``ttl`` seconds ago on the store's clock, and schedule claims as old.

        Returns:
            How many jobs were deleted.
        """
        ...  # pragma: no cover

    def claim_schedule(self, name: str, period: str, owner: str) -> bool:
        """Claim one period of a schedule: of every caller (in any process on this store)
        claiming the same ``(name, period)``, exactly one gets True ("the store decides").

        Args:
            name: The schedule's name (e.g. ``keepalive``).
            period: The period's label (e.g. the day, or the start-up window).
            owner: Who claims it (kept for operators).
        """
        ...  # pragma: no cover


class RawState(Protocol):
    """Test hook: a backend's stored values exactly as persisted (ciphertexts as bytes).

    For the conformance suite only (ciphertext swaps, tampering, plaintext canaries);
    engine code never uses it. Tables and columns have the names of the SQLite schema;
    rows are found by their key column (:data:`~tokenbroker.store.sealing.KEY_COLUMNS`).
    """

    def read(self, table: str, key: str | int, column: str) -> Any:
        """One stored value.

        Raises:
            KeyError: No such row.
        """
        ...  # pragma: no cover

    def write(self, table: str, key: str | int, column: str, value: Any) -> None:
        """Overwrite one stored value, bypassing every check (an attacker with the disk)."""
        ...  # pragma: no cover

    def persisted(self) -> bytes:
        """Every byte the backend keeps its state in (files, or its serialised memory)."""
        ...  # pragma: no cover


class Store(CredentialStore, ConsumerStore, SigningKeyStore, JobStore, Protocol):
    """A whole backend: credentials, consumers, signing keys, jobs, key rotation."""

    def stale_secrets(self) -> list[str]:
        """The rows holding a ciphertext not under the primary key, as ``table/key`` item
        names (secret-free), in a stable order: what :meth:`reseal_row` still has to do."""
        ...  # pragma: no cover

    def reseal_row(self, item: str) -> int:
        """Re-encrypt one row's ciphertexts (an item of :meth:`stale_secrets`) under the
        primary key, in one transaction: key rotation row by row, resumable after a crash.

        Returns:
            How many ciphertexts changed (0 when the row is gone or already rotated).

        Raises:
            ValueError: A malformed item name.
        """
        ...  # pragma: no cover

    def rotate_keys(self) -> int:
        """Re-encrypt every secret under the primary key in one transaction; afterwards the
        old keys are needed for nothing.

        Returns:
            How many ciphertexts were re-encrypted (0 when all are under the primary key).
        """
        ...  # pragma: no cover

    def close(self) -> None:
        """Release the backend's resources; the store is unusable afterwards."""
        ...  # pragma: no cover

    def raw(self) -> RawState:
        """Test hook (see :class:`RawState`)."""
        ...  # pragma: no cover
