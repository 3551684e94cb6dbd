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

from typing import Any, Protocol

from ..core.secret import Secret
from .rows import Attempt, CredentialRow, Lease, StoredToken

__all__ = ["ConsumerStore", "CredentialStore", "RawState", "SigningKeyStore", "Store"]


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


class Store(CredentialStore, ConsumerStore, SigningKeyStore, Protocol):
    """A whole backend: credentials, consumers, signing keys, key rotation."""

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
