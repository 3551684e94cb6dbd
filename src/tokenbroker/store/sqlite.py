"""The SQLite backend of the store protocol (:mod:`.base`).

A lease on a credential row is taken with the database clock in a ``BEGIN IMMEDIATE``
transaction and bumps a fence counter; every write that matters carries
``WHERE lease_fence = :fence`` (and, for refresh tokens, ``AND rt_version = :version``).

``store: sqlite:///path`` is a file in WAL mode with ``synchronous=FULL``;
``sqlite:///:memory:`` is the same schema in process memory. Secret columns are sealed by
:mod:`.sealing`; the schema and the database clock are in :mod:`.sqlite_schema`; opening,
migrating, transactions and the translation of SQLite's faults in :mod:`.sqlite_connection`;
the read-only check behind ``tokenbroker check`` in :mod:`.sqlite_probe`; consumers and
signing keys in :mod:`.sqlite_consumers`, jobs in :mod:`.sqlite_jobs`.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..core.crypto import Keyring
from ..core.secret import Secret
from .rows import Attempt, CredentialRow, Lease, StoredToken
from .sealing import SEALED, Sealer, parse_item
from .sqlite_connection import RawSQLite, SQLiteConnection
from .sqlite_consumers import SQLiteConsumers
from .sqlite_jobs import SQLiteJobs
from .sqlite_schema import ALL_SECRETS, NOW, OPEN_STATUSES

__all__ = ["SQLiteStore"]


class SQLiteStore(SQLiteConsumers, SQLiteJobs):
    """Credentials, leases, attempts, consumers, signing keys and jobs in one SQLite database.

    Args:
        path: A file path, or ``:memory:``.
        keyring: Encrypts and decrypts every secret column.
        busy_timeout: Seconds to wait for another process's write lock.

    Raises:
        StoreError: When the file cannot be opened or migrated.
        EncryptionKeyError: When stored secrets need a key the keyring lacks.
    """

    def __init__(self, path: str, keyring: Keyring, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._keyring = keyring
        self._sealer = Sealer(keyring)
        self._conn = SQLiteConnection(path, busy_timeout, self._check_keys)
        self._db = self._conn.db

    @classmethod
    def from_url(cls, url: str, keyring: Keyring, *, busy_timeout: float = 5.0) -> SQLiteStore:
        """Open ``sqlite:///relative/or/absolute/path`` (``sqlite:///:memory:`` in memory).

        Args:
            url: The ``store`` setting.
            keyring: The encryption keys.
            busy_timeout: Seconds to wait for a lock.

        Returns:
            The store.
        """
        return cls(url.removeprefix("sqlite:///"), keyring, busy_timeout=busy_timeout)

    def __repr__(self) -> str:
        return f"SQLiteStore(path={self.path!r})"

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def pragmas(self) -> dict[str, Any]:
        """The durability settings in force (asserted by tests)."""
        return {name: self.pragma(name) for name in ("journal_mode", "synchronous", "busy_timeout")}

    def pragma(self, name: str, value: int | str | None = None) -> Any:
        """Read, or set, one PRAGMA on the store's own connection.

        A documented test hook for SQLite-only faults (``query_only`` makes every write fail
        as on a read-only disk, ``max_page_count`` as on a full one); engine code never
        calls it.

        Args:
            name: A PRAGMA name (letters and underscores only).
            value: The value to set, or None to read.

        Returns:
            The PRAGMA's value (after setting it).

        Raises:
            ValueError: The name or value is not a plain word or number.
        """
        return self._conn.pragma(name, value)

    def raw(self) -> RawSQLite:
        """Test hook: the stored values as persisted (:class:`~.base.RawState`)."""
        return RawSQLite(self._conn)

    # -- reading -------------------------------------------------------------------------------

    def now(self) -> float:
        """The database clock, Unix seconds."""
        with self._conn.guard():
            value: float = self._db.execute(f"SELECT {NOW}").fetchone()[0]
            return value

    def load(self, row_id: str) -> CredentialRow | None:
        """Read and decrypt one credential row.

        Raises:
            StoreCorruptError: A ciphertext fails its integrity check.
        """
        with self._conn.guard():
            row = self._db.execute("SELECT * FROM tb_credential WHERE id = ?", (row_id,)).fetchone()
            columns = [
                d[0] for d in self._db.execute("SELECT * FROM tb_credential LIMIT 0").description
            ]
        return (
            None if row is None else self._sealer.credential(dict(zip(columns, row, strict=True)))
        )

    def states(self) -> list[dict[str, Any]]:
        """Every credential's non-secret columns, for ``tokenbroker status`` (no key needed)."""
        with self._conn.guard():
            cursor = self._db.execute(
                "SELECT id, provider, scope, account, state, at_expires_at, last_refresh,"
                " last_error, rt_version, lease_owner, lease_expires_at"
                " FROM tb_credential ORDER BY provider, account, scope, id"
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def attempts(self, row_id: str) -> list[Attempt]:
        """Every recorded refresh attempt of a credential, oldest first."""
        with self._conn.guard():
            rows = self._db.execute(
                "SELECT id, from_version, fence, started_at, status, recovery FROM tb_attempt"
                " WHERE credential_id = ? ORDER BY id",
                (row_id,),
            ).fetchall()
        return [Attempt(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

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
        """Take the lease on a credential if it is free, expired, or held by ``steal_from``.

        Creates the row if needed. Every successful take bumps the fence.

        Args:
            row_id: The credential row.
            provider: Its provider's name.
            owner: Our owner id.
            ttl: Lease time-to-live, seconds.
            steal_from: A holder whose lease we may take over (its process is gone).
            scope: The row's canonical scope, kept in plaintext for ``status`` (not a secret).
            account: The row's account name, likewise.

        Returns:
            The lease, or None when someone else holds it.
        """
        with self._conn.tx():
            self._db.execute(
                "INSERT INTO tb_credential (id, provider, scope, account, updated_at)"
                f" VALUES (?, ?, ?, ?, {NOW}) ON CONFLICT (id) DO UPDATE SET"
                " scope = excluded.scope, account = excluded.account"
                " WHERE excluded.scope IS NOT NULL",
                (row_id, provider, scope, account),
            )
            row = self._db.execute(
                f"UPDATE tb_credential SET lease_owner = ?, lease_fence = lease_fence + 1,"
                f" lease_expires_at = {NOW} + ? WHERE id = ? AND (lease_owner IS NULL"
                f" OR lease_expires_at < {NOW} OR lease_owner = ?)"
                " RETURNING lease_fence, rt_version, lease_expires_at",
                (owner, ttl, row_id, steal_from or owner),
            ).fetchone()
        if row is None:
            return None
        return Lease(row_id, owner, row[0], row[1], row[2])

    def release(self, lease: Lease) -> None:
        """Give the lease back if we still hold it (a no-op after a takeover)."""
        with self._conn.tx():
            self._db.execute(
                "UPDATE tb_credential SET lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = ? AND lease_fence = ? AND lease_owner = ?",
                (lease.id, lease.fence, lease.owner),
            )

    # -- refresh protocol ----------------------------------------------------------------------

    def begin_attempt(self, lease: Lease, *, recovery: bool = False) -> int | None:
        """Write the intent record (step 3) and mark the credential ``refreshing``.

        Returns:
            The attempt id, or None when the lease was lost (fenced out).
        """
        with self._conn.tx():
            changed = self._db.execute(
                "UPDATE tb_credential SET state = 'refreshing', updated_at = "
                + NOW
                + " WHERE id = ? AND lease_fence = ? AND rt_version = ?",
                (lease.id, lease.fence, lease.rt_version),
            ).rowcount
            if changed != 1:
                return None
            cursor = self._db.execute(
                "INSERT INTO tb_attempt (credential_id, from_version, fence, started_at, status,"
                f" recovery) VALUES (?, ?, ?, {NOW}, 'intent', ?)",
                (lease.id, lease.rt_version, lease.fence, int(recovery)),
            )
            attempt_id = cursor.lastrowid
        assert attempt_id is not None
        return attempt_id

    def open_attempts(self, row_id: str) -> list[Attempt]:
        """Attempts that may have reached the provider without a stored outcome."""
        return [a for a in self.attempts(row_id) if a.status in OPEN_STATUSES]

    def close_attempts(self, lease: Lease, ids: list[int], status: str) -> bool:
        """Mark earlier open attempts resolved (e.g. ``superseded`` after a recovery), fenced.

        Returns:
            Whether the lease was still ours; a fenced-out holder changes nothing.
        """
        with self._conn.tx():
            held = self._db.execute(
                "SELECT 1 FROM tb_credential WHERE id = ? AND lease_fence = ?",
                (lease.id, lease.fence),
            ).fetchone()
            if held is None:
                return False
            for attempt_id in ids:
                self._db.execute(
                    f"UPDATE tb_attempt SET status = ?, finished_at = {NOW}"
                    " WHERE id = ? AND credential_id = ?",
                    (status, attempt_id, lease.id),
                )
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
        with self._conn.tx():
            if attempt_id is not None:
                raw_ct = self._sealer.seal(raw, "tb_attempt", str(attempt_id), "raw")
                self._db.execute(
                    f"UPDATE tb_attempt SET status = ?, error = ?, raw_ct = ?, finished_at = {NOW}"
                    " WHERE id = ?",
                    (status, error, raw_ct, attempt_id),
                )
            self._db.execute(
                f"UPDATE tb_credential SET state = ?, last_error = ?, updated_at = {NOW}"
                " WHERE id = ? AND lease_fence = ?",
                (state, error, lease.id, lease.fence),
            )

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

        The tokens are applied only if the fence and refresh-token version still
        match; otherwise the reply is kept as an ``orphaned`` attempt.

        Args:
            lease: The lease the request was sent under.
            attempt_id: The intent record, for refresh-token credentials.
            token: The new access token.
            refresh_token: The refresh token to keep (new, or the one presented).
            seed_digest: Digest of the configured seed this chain descends from.
            raw: The provider's raw reply, kept encrypted.

        Returns:
            True when applied, False when fenced out (orphaned).
        """
        version = lease.rt_version + (1 if refresh_token is not None else 0)
        with self._conn.tx():
            if attempt_id is not None:
                self._db.execute(
                    "UPDATE tb_attempt SET status = 'received', raw_ct = ? WHERE id = ?",
                    (self._sealer.seal(raw, "tb_attempt", str(attempt_id), "raw"), attempt_id),
                )
            current = self._db.execute(
                "SELECT at_version FROM tb_credential WHERE id = ?", (lease.id,)
            ).fetchone()
            at_version = (current[0] if current else 0) + 1
            params: list[Any] = [
                token.fingerprint,
                self._sealer.seal_access_token(token.token, lease.id, at_version),
                at_version,
                token.obtained_at,
                token.token.expires_at,
                token.lifetime,
                token.obtained_at,
            ]
            rt_sql = ""
            if refresh_token is not None:
                rt_sql = ", rt_ct = ?, rt_version = ?, seed_digest = COALESCE(?, seed_digest)"
                rt_ct = self._sealer.seal(
                    refresh_token.reveal().encode(), "tb_credential", lease.id, "rt", version
                )
                params += [rt_ct, version, seed_digest]
            params += [lease.id, lease.fence, lease.rt_version]
            applied = self._db.execute(
                "UPDATE tb_credential SET fingerprint = ?, at_ct = ?, at_version = ?,"
                " at_obtained_at = ?, at_expires_at = ?, at_lifetime = ?, last_refresh = ?,"
                f" state = 'active', last_error = NULL, updated_at = {NOW}{rt_sql}"
                " WHERE id = ? AND lease_fence = ? AND rt_version = ?",
                params,
            ).rowcount
            if attempt_id is not None:
                self._db.execute(
                    f"UPDATE tb_attempt SET status = ?, to_version = ?, finished_at = {NOW}"
                    " WHERE id = ?",
                    (
                        "succeeded" if applied else "orphaned",
                        version if applied else None,
                        attempt_id,
                    ),
                )
        return applied == 1

    def set_state(self, lease: Lease, state: str, error: str | None = None) -> bool:
        """Set a credential's state under the lease (fenced).

        Returns:
            Whether the lease was still ours.
        """
        with self._conn.tx():
            return (
                self._db.execute(
                    f"UPDATE tb_credential SET state = ?, last_error = ?, updated_at = {NOW}"
                    " WHERE id = ? AND lease_fence = ?",
                    (state, error, lease.id, lease.fence),
                ).rowcount
                == 1
            )

    def reseed(self, lease: Lease, seed: Secret, digest: str) -> Lease | None:
        """Replace the refresh token with a newly configured seed (an operator re-authorised).

        Returns:
            The lease with the new version, or None when fenced out.
        """
        version = lease.rt_version + 1
        rt_ct = self._sealer.seal(seed.reveal().encode(), "tb_credential", lease.id, "rt", version)
        with self._conn.tx():
            changed = self._db.execute(
                "UPDATE tb_credential SET rt_ct = ?, rt_version = ?, seed_digest = ?, at_ct = NULL,"
                f" state = 'active', last_error = NULL, updated_at = {NOW}"
                " WHERE id = ? AND lease_fence = ? AND rt_version = ?",
                (rt_ct, version, digest, lease.id, lease.fence, lease.rt_version),
            ).rowcount
            if changed:
                self._db.execute(
                    f"UPDATE tb_attempt SET status = 'superseded', finished_at = {NOW}"
                    " WHERE credential_id = ? AND status IN ('intent', 'in_doubt')",
                    (lease.id,),
                )
        if changed != 1:
            return None
        return Lease(lease.id, lease.owner, lease.fence, version, lease.expires_at)

    # -- key rotation ---------------------------------------------------------------------------

    def rotate_keys(self) -> int:
        """Re-encrypt every secret with the primary key, in one transaction.

        Returns:
            How many ciphertexts were re-encrypted.
        """
        with self._conn.tx():
            return sum(self._reseal(table, key) for table, key in self._stale())

    def stale_secrets(self) -> list[str]:
        """Rows with a ciphertext not under the primary key, as ``table/key`` items."""
        with self._conn.guard():
            return [f"{table}/{key}" for table, key in self._stale()]

    def reseal_row(self, item: str) -> int:
        """Re-encrypt one row's ciphertexts under the primary key, in one transaction.

        Returns:
            How many changed (0 when the row is gone or already rotated).

        Raises:
            ValueError: A malformed item name.
        """
        table, key = parse_item(item)
        with self._conn.tx():
            return self._reseal(table, key)

    def _stale(self) -> list[tuple[str, str]]:
        found: dict[tuple[str, str], None] = {}
        for table, key, column, _, _ in SEALED:
            rows = self._db.execute(
                f"SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL ORDER BY {key}"
            ).fetchall()
            for row_key, blob in rows:
                if self._keyring.needs_rotation(blob):
                    found[(table, str(row_key))] = None
        return list(found)

    def _reseal(self, table: str, row_key: str) -> int:
        """Re-encrypt one row's sealed columns (inside the caller's transaction)."""
        count = 0
        for sealed_table, key, column, name, version in SEALED:
            if sealed_table != table:
                continue
            found = self._db.execute(
                f"SELECT {key}, {column}, {version or 'NULL'} FROM {table}"
                f" WHERE {key} = ? AND {column} IS NOT NULL",
                (row_key,),
            ).fetchone()
            if found is None:
                continue
            fresh = self._sealer.reseal(found[1], table, str(found[0]), name, found[2])
            if fresh is not None:
                self._db.execute(
                    f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (fresh, found[0])
                )
                count += 1
        return count

    def _check_keys(self, db: sqlite3.Connection) -> None:
        """Refuse to open when a stored secret needs a key the keyring lacks."""
        self._sealer.check_keys(blob for (blob,) in db.execute(ALL_SECRETS))
