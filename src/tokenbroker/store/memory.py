"""The in-process backend of the store protocol (:mod:`.base`): dicts behind one lock.

``store: memory`` (and ``memory://``). Nothing survives the process; the fencing is the
same as SQLite's — every compare-and-set runs under the one lock, and every check is made
before anything is written, so a refused or failing call changes nothing. Secrets are
sealed exactly as on disk (:mod:`.sealing`), so this is a second real implementation of
the protocol, not a shortcut around it. The clock is the host's (one process, one clock).
Consumers and signing keys are in :mod:`.memory_consumers`, jobs in :mod:`.memory_jobs`.
"""

from __future__ import annotations

import itertools
import pickle
import threading
import time
from typing import Any

from ..core.crypto import Keyring
from ..core.secret import Secret
from ..errors import StoreError
from .memory_consumers import MemoryConsumers
from .memory_jobs import MemoryJobs
from .rows import Attempt, CredentialRow, JobEventRow, Lease, StoredToken
from .sealing import KEY_COLUMNS, SEALED, Sealer, parse_item
from .sqlite_schema import MIGRATIONS, OPEN_STATUSES

__all__ = ["MemoryState", "MemoryStore"]

#: The memory backend keeps the tables of the latest SQLite schema.
SCHEMA_VERSION = len(MIGRATIONS)


#: The non-secret columns :meth:`MemoryStore.states` shows.
_STATE_COLUMNS = (
    "id",
    "provider",
    "scope",
    "account",
    "state",
    "at_expires_at",
    "last_refresh",
    "last_error",
    "rt_version",
    "lease_owner",
    "lease_expires_at",
)


class MemoryState:
    """Everything a memory store holds. Several :class:`MemoryStore` objects may share one,
    like several connections to one database (the conformance suite's "reopen")."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.tables: dict[str, dict[Any, dict[str, Any]]] = {name: {} for name in KEY_COLUMNS}
        self.tables["tb_meta"]["schema_version"] = {"value": str(SCHEMA_VERSION)}
        self.attempt_ids = itertools.count(1)
        self.job_numbers = itertools.count(1)
        self.job_events: dict[str, list[JobEventRow]] = {}
        self.schedules: dict[tuple[str, str], float] = {}

    def __repr__(self) -> str:
        return f"MemoryState(credentials={len(self.tables['tb_credential'])})"


def _credential(
    row_id: str, provider: str, scope: str | None, account: str | None
) -> dict[str, Any]:
    return {
        "id": row_id,
        "provider": provider,
        "fingerprint": "",
        "at_ct": None,
        "at_version": 0,
        "at_obtained_at": None,
        "at_expires_at": None,
        "at_lifetime": None,
        "rt_ct": None,
        "rt_version": 0,
        "seed_digest": None,
        "state": "active",
        "last_error": None,
        "last_refresh": None,
        "updated_at": time.time(),
        "lease_owner": None,
        "lease_fence": 0,
        "lease_expires_at": None,
        "scope": scope,
        "account": account,
    }


class MemoryStore(MemoryConsumers, MemoryJobs):
    """Credentials, leases, attempts, consumers, signing keys and jobs in process memory.

    Args:
        keyring: Seals and opens every secret.
        state: Shared state to open (a fresh, empty one when None).

    Raises:
        StoreError: The state has a newer schema than this tokenbroker knows.
        EncryptionKeyError: Stored secrets need a key the keyring lacks.
    """

    def __init__(self, keyring: Keyring, *, state: MemoryState | None = None) -> None:
        self.state = state if state is not None else MemoryState()
        self._sealer = Sealer(keyring)
        self._lock = self.state.lock
        self._tables = self.state.tables
        self._job_events = self.state.job_events
        self._schedules = self.state.schedules
        with self._lock:
            version = int(self._tables["tb_meta"]["schema_version"]["value"])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the store has schema version {version}; "
                    f"this tokenbroker knows up to {SCHEMA_VERSION}"
                )
            self._sealer.check_keys(self._blobs())

    @classmethod
    def from_url(cls, url: str, keyring: Keyring) -> MemoryStore:
        """Open ``memory://`` (or the bare ``memory``): a new, empty store.

        Returns:
            The store.
        """
        return cls(keyring)

    def __repr__(self) -> str:
        return "MemoryStore()"

    def close(self) -> None:
        """Nothing to release: the state lives as long as someone refers to it."""

    def raw(self) -> _RawMemory:
        """Test hook: the stored values as kept (:class:`~.base.RawState`)."""
        return _RawMemory(self.state)

    # -- reading -------------------------------------------------------------------------------

    def now(self) -> float:
        """The host clock, Unix seconds (the memory store's clock)."""
        return time.time()

    def load(self, row_id: str) -> CredentialRow | None:
        """Read and decrypt one credential row (see :class:`~.base.CredentialStore`)."""
        with self._lock:
            row = self._tables["tb_credential"].get(row_id)
            copy = None if row is None else dict(row)
        return None if copy is None else self._sealer.credential(copy)

    def states(self) -> list[dict[str, Any]]:
        """Every credential's non-secret columns (see :class:`~.base.CredentialStore`)."""
        names = _STATE_COLUMNS
        with self._lock:
            rows = [{n: row[n] for n in names} for row in self._tables["tb_credential"].values()]

        # SQL's ORDER BY provider, account, scope, id: NULLs first.
        def order(row: dict[str, Any]) -> tuple[Any, ...]:
            account, scope = row["account"], row["scope"]
            nulls_first = (account is not None, account or "", scope is not None, scope or "")
            return (row["provider"], *nulls_first, row["id"])

        return sorted(rows, key=order)

    def attempts(self, row_id: str) -> list[Attempt]:
        """Every recorded refresh attempt of a credential, oldest first."""
        with self._lock:
            rows = [a for a in self._tables["tb_attempt"].values() if a["credential_id"] == row_id]
            return [
                Attempt(
                    a["id"],
                    a["from_version"],
                    a["fence"],
                    a["started_at"],
                    a["status"],
                    bool(a["recovery"]),
                )
                for a in sorted(rows, key=lambda a: int(a["id"]))
            ]

    def open_attempts(self, row_id: str) -> list[Attempt]:
        """Attempts that may have reached the provider without a stored outcome."""
        return [a for a in self.attempts(row_id) if a.status in OPEN_STATUSES]

    # -- leases --------------------------------------------------------------------------------

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
        """Take the lease if free, expired or held by ``steal_from`` (see the protocol)."""
        with self._lock:
            now = self.now()
            row = self._tables["tb_credential"].get(row_id)
            if row is None:
                row = _credential(row_id, provider, scope, account)
                self._tables["tb_credential"][row_id] = row
            elif scope is not None:
                row["scope"], row["account"] = scope, account
            holder, expires = row["lease_owner"], row["lease_expires_at"]
            free = holder is None or (expires is not None and expires < now)
            if not free and holder != (steal_from or owner):
                return None
            row["lease_owner"] = owner
            row["lease_fence"] += 1
            row["lease_expires_at"] = now + ttl
            return Lease(row_id, owner, row["lease_fence"], row["rt_version"], now + ttl)

    def release(self, lease: Lease) -> None:
        """Give the lease back if we still hold it (a no-op after a takeover)."""
        with self._lock:
            row = self._held(lease)
            if row is not None and row["lease_owner"] == lease.owner:
                row["lease_owner"] = row["lease_expires_at"] = None

    # -- refresh protocol ----------------------------------------------------------------------

    def begin_attempt(self, lease: Lease, *, recovery: bool = False) -> int | None:
        """Write the intent record and mark the credential ``refreshing`` (fenced)."""
        with self._lock:
            row = self._held(lease, version=True)
            if row is None:
                return None
            now = self.now()
            attempt_id = next(self.state.attempt_ids)
            row["state"], row["updated_at"] = "refreshing", now
            self._tables["tb_attempt"][attempt_id] = {
                "id": attempt_id,
                "credential_id": lease.id,
                "from_version": lease.rt_version,
                "to_version": None,
                "fence": lease.fence,
                "started_at": now,
                "finished_at": None,
                "status": "intent",
                "recovery": int(recovery),
                "raw_ct": None,
                "error": None,
            }
            return attempt_id

    def close_attempts(self, lease: Lease, ids: list[int], status: str) -> bool:
        """Mark earlier open attempts resolved, fenced (see the protocol)."""
        with self._lock:
            if self._held(lease) is None:
                return False
            now = self.now()
            for attempt_id in ids:
                attempt = self._tables["tb_attempt"].get(attempt_id)
                if attempt is not None and attempt["credential_id"] == lease.id:
                    attempt.update(status=status, finished_at=now)
            return True

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
        """Record a failed attempt and the credential's resulting state (fenced)."""
        raw_ct = None if attempt_id is None else self._seal_raw(raw, attempt_id)
        with self._lock:
            now = self.now()
            attempt = self._tables["tb_attempt"].get(attempt_id)
            if attempt is not None:
                attempt.update(status=status, error=error, raw_ct=raw_ct, finished_at=now)
            row = self._held(lease)
            if row is not None:
                row.update(state=state, last_error=error, updated_at=now)

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
        """Store a reply and apply its tokens, fenced (see the protocol)."""
        version = lease.rt_version + (1 if refresh_token is not None else 0)
        raw_ct = None if attempt_id is None else self._seal_raw(raw, attempt_id)
        rt_ct = None
        if refresh_token is not None:
            rt_ct = self._sealer.seal(
                refresh_token.reveal().encode(), "tb_credential", lease.id, "rt", version
            )
        with self._lock:
            now = self.now()
            current = self._tables["tb_credential"].get(lease.id)
            at_version = (current["at_version"] if current else 0) + 1
            at_ct = self._sealer.seal_access_token(token.token, lease.id, at_version)
            attempt = self._tables["tb_attempt"].get(attempt_id)
            if attempt is not None:
                attempt.update(status="received", raw_ct=raw_ct)
            row = self._held(lease, version=True)
            if row is not None:
                row.update(
                    fingerprint=token.fingerprint,
                    at_ct=at_ct,
                    at_version=at_version,
                    at_obtained_at=token.obtained_at,
                    at_expires_at=token.token.expires_at,
                    at_lifetime=token.lifetime,
                    last_refresh=token.obtained_at,
                    state="active",
                    last_error=None,
                    updated_at=now,
                )
                if refresh_token is not None:
                    row.update(rt_ct=rt_ct, rt_version=version)
                    if seed_digest is not None:
                        row["seed_digest"] = seed_digest
            if attempt is not None:
                attempt.update(
                    status="succeeded" if row else "orphaned",
                    to_version=version if row else None,
                    finished_at=now,
                )
            return row is not None

    def set_state(self, lease: Lease, state: str, error: str | None = None) -> bool:
        """Set a credential's state under the lease (fenced)."""
        with self._lock:
            row = self._held(lease)
            if row is None:
                return False
            row.update(state=state, last_error=error, updated_at=self.now())
            return True

    def reseed(self, lease: Lease, seed: Secret, digest: str) -> Lease | None:
        """Replace the refresh token with a newly configured seed (fenced)."""
        version = lease.rt_version + 1
        rt_ct = self._sealer.seal(seed.reveal().encode(), "tb_credential", lease.id, "rt", version)
        with self._lock:
            row = self._held(lease, version=True)
            if row is None:
                return None
            now = self.now()
            row.update(rt_ct=rt_ct, rt_version=version, seed_digest=digest, at_ct=None)
            row.update(state="active", last_error=None, updated_at=now)
            for attempt in self._tables["tb_attempt"].values():
                if attempt["credential_id"] == lease.id and attempt["status"] in OPEN_STATUSES:
                    attempt.update(status="superseded", finished_at=now)
        return Lease(lease.id, lease.owner, lease.fence, version, lease.expires_at)

    # -- key rotation ---------------------------------------------------------------------------

    def rotate_keys(self) -> int:
        """Re-encrypt every secret with the primary key, all or nothing.

        Returns:
            How many ciphertexts were re-encrypted.
        """
        with self._lock:
            fresh: list[tuple[dict[str, Any], str, bytes]] = []
            for table, key in self._stale():
                fresh += self._resealed(table, self._tables[table][key])
            for row, column, blob in fresh:
                row[column] = blob
            return len(fresh)

    def stale_secrets(self) -> list[str]:
        """Rows with a ciphertext not under the primary key, as ``table/key`` items."""
        with self._lock:
            return [f"{table}/{key}" for table, key in self._stale()]

    def reseal_row(self, item: str) -> int:
        """Re-encrypt one row's ciphertexts under the primary key, all or nothing.

        Raises:
            ValueError: A malformed item name.
        """
        table, key = parse_item(item)
        with self._lock:
            rows = self._tables[table]
            row = rows.get(int(key) if table == "tb_attempt" and key.isdigit() else key)
            fresh = [] if row is None else self._resealed(table, row)
            for target, column, blob in fresh:
                target[column] = blob
            return len(fresh)

    def _stale(self) -> list[tuple[str, Any]]:
        """Every (table, row key) holding a ciphertext not under the primary key."""
        found: dict[tuple[str, Any], None] = {}
        for table, key, column, _, _ in SEALED:
            for row in sorted(self._tables[table].values(), key=lambda r: str(r[key])):
                if row[column] is not None and self._sealer.keyring.needs_rotation(row[column]):
                    found[(table, row[key])] = None
        return list(found)

    def _resealed(self, table: str, row: dict[str, Any]) -> list[tuple[dict[str, Any], str, bytes]]:
        """The new ciphertexts of one row's sealed columns (nothing written yet)."""
        fresh = []
        for sealed_table, key, column, name, version in SEALED:
            if sealed_table != table or row[column] is None:
                continue
            row_version = None if version is None else row[version]
            blob = self._sealer.reseal(row[column], table, str(row[key]), name, row_version)
            if blob is not None:
                fresh.append((row, column, blob))
        return fresh

    # -- internals -----------------------------------------------------------------------------

    def _next_job(self) -> int:
        return next(self.state.job_numbers)

    def _held(self, lease: Lease, *, version: bool = False) -> dict[str, Any] | None:
        """The credential row if ``lease``'s fence (and, with ``version``, its refresh-token
        version) still match it; the caller holds the lock."""
        row = self._tables["tb_credential"].get(lease.id)
        if row is None or row["lease_fence"] != lease.fence:
            return None
        if version and row["rt_version"] != lease.rt_version:
            return None
        return row

    def _seal_raw(self, raw: bytes | None, attempt_id: int) -> bytes | None:
        return self._sealer.seal(raw, "tb_attempt", str(attempt_id), "raw")

    def _blobs(self) -> list[bytes]:
        return [
            row[column]
            for table, _, column, _, _ in SEALED
            for row in self._tables[table].values()
            if row[column] is not None
        ]


class _RawMemory:
    """The memory side of the raw test hook (:class:`~.base.RawState`)."""

    def __init__(self, state: MemoryState) -> None:
        self._state = state

    def read(self, table: str, key: str | int, column: str) -> Any:
        with self._state.lock:
            return self._state.tables[table][key][column]

    def write(self, table: str, key: str | int, column: str, value: Any) -> None:
        with self._state.lock:
            self._state.tables[table][key][column] = value

    def persisted(self) -> bytes:
        """The tables, pickled: strings and bytes appear in it as they are held."""
        with self._state.lock:
            return pickle.dumps(self._state.tables)
