"""The PostgreSQL backend of the store protocol (:mod:`.base`): cluster mode.

Several broker replicas share one database. A lease is one ``UPDATE … RETURNING`` judged on
the *database's* clock (``clock_timestamp()``), never a replica's: in READ COMMITTED a
contending acquire waits on the row lock, re-checks its ``WHERE`` against the winner's
committed row and returns nothing, so no ``FOR UPDATE`` or advisory lock is needed and no
connection is held across the upstream call. Every write that matters carries
``WHERE lease_fence = %s`` (and, for refresh tokens, ``AND rt_version = %s``); the
write-ahead intent, and the raw reply with the tokens it carries, each go in one
transaction.

``store: postgresql://user@host/db?min_size=1&max_size=8&timeout=5``: the URL, the pool,
migrations (under an advisory lock) and the translation of psycopg's faults are in
:mod:`.postgres_connection`; the schema and the clock in :mod:`.postgres_schema`; secret
columns are sealed by :mod:`.sealing` exactly as on SQLite; consumers and signing keys are
in :mod:`.postgres_consumers`, jobs in :mod:`.postgres_jobs`. A PostgreSQL outage is a
:class:`~tokenbroker.errors.StoreError` on each call while it lasts (``503
store_unavailable`` in the API); the same store object works again once the server is back.
Needs the ``postgres`` extra (psycopg 3, psycopg_pool).
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..core.crypto import Keyring
from ..core.secret import Secret
from .postgres_connection import PostgresConnection, RawPostgres
from .postgres_consumers import PostgresConsumers
from .postgres_jobs import PostgresJobs
from .postgres_schema import ALL_SECRETS, NOW, OPEN_STATUSES
from .rows import Attempt, CredentialRow, Lease, StoredToken
from .sealing import SEALED, Sealer, parse_item

__all__ = ["PostgresStore"]

_STATE_COLUMNS = (
    "id, provider, scope, account, state, at_expires_at, last_refresh, last_error, rt_version,"
    " lease_owner, lease_expires_at"
)


class PostgresStore(PostgresConsumers, PostgresJobs):
    """Credentials, leases, attempts, consumers, signing keys and jobs in one PostgreSQL
    database.

    Args:
        url: ``postgresql://…`` (pool settings in its query, see :mod:`.postgres_connection`).
        keyring: Encrypts and decrypts every secret column.
        timeout: Seconds a call waits for a pooled connection when the URL names none.

    Raises:
        StoreError: The URL is malformed, or the database cannot be reached or migrated.
        EncryptionKeyError: Stored secrets need a key the keyring lacks.
    """

    def __init__(self, url: str, keyring: Keyring, *, timeout: float = 5.0) -> None:
        self._sealer = Sealer(keyring)
        self._conn = PostgresConnection(url, timeout, self._check_keys)
        self.url = self._conn.where

    @classmethod
    def from_url(cls, url: str, keyring: Keyring, *, busy_timeout: float = 5.0) -> PostgresStore:
        """Open the store at ``url`` (the registry's entry point).

        Args:
            url: The ``store`` setting.
            keyring: The encryption keys.
            busy_timeout: The pool timeout when the URL names none.

        Returns:
            The store.
        """
        return cls(url, keyring, timeout=busy_timeout)

    def __repr__(self) -> str:
        return f"PostgresStore(url={self.url!r})"

    def close(self) -> None:
        """Close the pool."""
        self._conn.close()

    def raw(self) -> RawPostgres:
        """Test hook: the stored values as persisted (:class:`~.base.RawState`)."""
        return RawPostgres(self._conn)

    # -- reading -------------------------------------------------------------------------------

    def now(self) -> float:
        """The database clock, Unix seconds."""
        with self._conn.tx() as cur:
            cur.execute(f"SELECT {NOW}")
            value: float = _one(cur)[0]
            return value

    def load(self, row_id: str) -> CredentialRow | None:
        """Read and decrypt one credential row.

        Raises:
            StoreCorruptError: A ciphertext fails its integrity check.
        """
        with self._conn.tx() as cur:
            cur.execute("SELECT * FROM tb_credential WHERE id = %s", (row_id,))
            row = cur.fetchone()
            columns = [d.name for d in cur.description or ()]
        return (
            None if row is None else self._sealer.credential(dict(zip(columns, row, strict=True)))
        )

    def states(self) -> list[dict[str, Any]]:
        """Every credential's non-secret columns, for ``tokenbroker status`` (no key needed)."""
        with self._conn.tx() as cur:
            # NULLS FIRST: the order SQLite gives, so status reads the same on both.
            cur.execute(
                f"SELECT {_STATE_COLUMNS} FROM tb_credential ORDER BY provider NULLS FIRST,"
                " account NULLS FIRST, scope NULLS FIRST, id"
            )
            names = [d.name for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def attempts(self, row_id: str) -> list[Attempt]:
        """Every recorded refresh attempt of a credential, oldest first."""
        with self._conn.tx() as cur:
            cur.execute(
                "SELECT id, from_version, fence, started_at, status, recovery FROM tb_attempt"
                " WHERE credential_id = %s ORDER BY id",
                (row_id,),
            )
            rows = cur.fetchall()
        return [Attempt(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

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
        """Take the lease on a credential if it is free, expired on the database's clock, or
        held by ``steal_from``; creates the row if needed. Every successful take bumps the fence.

        Args:
            row_id: The credential row.
            provider: Its provider's name.
            owner: Our owner id.
            ttl: Lease time-to-live, seconds of the database's clock.
            steal_from: A holder whose lease we may take over (its process is gone).
            scope: The row's canonical scope, kept in plaintext for ``status`` (not a secret).
            account: The row's account name, likewise.

        Returns:
            The lease, or None when someone else holds it.
        """
        with self._conn.tx() as cur:
            cur.execute(
                "INSERT INTO tb_credential (id, provider, scope, account, updated_at)"
                f" VALUES (%s, %s, %s, %s, {NOW}) ON CONFLICT (id) DO UPDATE SET"
                " scope = excluded.scope, account = excluded.account"
                " WHERE excluded.scope IS NOT NULL",
                (row_id, provider, scope, account),
            )
            cur.execute(
                f"UPDATE tb_credential SET lease_owner = %s, lease_fence = lease_fence + 1,"
                f" lease_expires_at = {NOW} + %s WHERE id = %s AND (lease_owner IS NULL"
                f" OR lease_expires_at < {NOW} OR lease_owner = %s)"
                " RETURNING lease_fence, rt_version, lease_expires_at",
                (owner, float(ttl), row_id, steal_from or owner),
            )
            row = cur.fetchone()
        if row is None:
            return None
        return Lease(row_id, owner, row[0], row[1], row[2])

    def release(self, lease: Lease) -> None:
        """Give the lease back if we still hold it (a no-op after a takeover)."""
        with self._conn.tx() as cur:
            cur.execute(
                "UPDATE tb_credential SET lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = %s AND lease_fence = %s AND lease_owner = %s",
                (lease.id, lease.fence, lease.owner),
            )

    # -- refresh protocol ----------------------------------------------------------------------

    def begin_attempt(self, lease: Lease, *, recovery: bool = False) -> int | None:
        """Write the intent record (step 3) and mark the credential ``refreshing``, in one
        transaction, only under the current fence and refresh-token version.

        Returns:
            The attempt id, or None when the lease was lost (fenced out; nothing written).
        """
        with self._conn.tx() as cur:
            cur.execute(
                f"UPDATE tb_credential SET state = 'refreshing', updated_at = {NOW}"
                " WHERE id = %s AND lease_fence = %s AND rt_version = %s",
                (lease.id, lease.fence, lease.rt_version),
            )
            if cur.rowcount != 1:
                return None
            cur.execute(
                "INSERT INTO tb_attempt (credential_id, from_version, fence, started_at, status,"
                f" recovery) VALUES (%s, %s, %s, {NOW}, 'intent', %s) RETURNING id",
                (lease.id, lease.rt_version, lease.fence, recovery),
            )
            attempt_id: int = _one(cur)[0]
        return attempt_id

    def close_attempts(self, lease: Lease, ids: list[int], status: str) -> bool:
        """Mark earlier open attempts resolved (e.g. ``superseded`` after a recovery), fenced.

        Returns:
            Whether the lease was still ours; a fenced-out holder changes nothing.
        """
        with self._conn.tx() as cur:
            # FOR UPDATE: the fence cannot move between this check and the updates below.
            cur.execute(
                "SELECT 1 FROM tb_credential WHERE id = %s AND lease_fence = %s FOR UPDATE",
                (lease.id, lease.fence),
            )
            if cur.fetchone() is None:
                return False
            cur.execute(
                f"UPDATE tb_attempt SET status = %s, finished_at = {NOW}"
                " WHERE id = ANY(%s) AND credential_id = %s",
                (status, list(ids), lease.id),
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
        """Record an attempt's outcome (its raw reply sealed) and, fenced, the credential's
        resulting state and last error, in one transaction."""
        with self._conn.tx() as cur:
            if attempt_id is not None:
                raw_ct = self._sealer.seal(raw, "tb_attempt", str(attempt_id), "raw")
                cur.execute(
                    f"UPDATE tb_attempt SET status = %s, error = %s, raw_ct = %s,"
                    f" finished_at = {NOW} WHERE id = %s",
                    (status, error, raw_ct, attempt_id),
                )
            cur.execute(
                f"UPDATE tb_credential SET state = %s, last_error = %s, updated_at = {NOW}"
                " WHERE id = %s AND lease_fence = %s",
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

        The raw reply is kept, sealed, on the attempt whatever happens; the tokens are applied
        only if the fence and refresh-token version still match, else the attempt is
        ``orphaned``.

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
        with self._conn.tx() as cur:
            if attempt_id is not None:
                cur.execute(
                    "UPDATE tb_attempt SET status = 'received', raw_ct = %s WHERE id = %s",
                    (self._sealer.seal(raw, "tb_attempt", str(attempt_id), "raw"), attempt_id),
                )
            # The new access token is sealed for at_version + 1: lock the row so no other
            # commit can take that version between this read and the write below.
            cur.execute(
                "SELECT at_version FROM tb_credential WHERE id = %s FOR UPDATE", (lease.id,)
            )
            current = cur.fetchone()
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
                rt_sql = ", rt_ct = %s, rt_version = %s, seed_digest = COALESCE(%s, seed_digest)"
                rt_ct = self._sealer.seal(
                    refresh_token.reveal().encode(), "tb_credential", lease.id, "rt", version
                )
                params += [rt_ct, version, seed_digest]
            params += [lease.id, lease.fence, lease.rt_version]
            cur.execute(
                "UPDATE tb_credential SET fingerprint = %s, at_ct = %s, at_version = %s,"
                " at_obtained_at = %s, at_expires_at = %s, at_lifetime = %s, last_refresh = %s,"
                f" state = 'active', last_error = NULL, updated_at = {NOW}{rt_sql}"
                " WHERE id = %s AND lease_fence = %s AND rt_version = %s",
                params,
            )
            applied = cur.rowcount == 1
            if attempt_id is not None:
                cur.execute(
                    f"UPDATE tb_attempt SET status = %s, to_version = %s, finished_at = {NOW}"
                    " WHERE id = %s",
                    (
                        "succeeded" if applied else "orphaned",
                        version if applied else None,
                        attempt_id,
                    ),
                )
        return applied

    def set_state(self, lease: Lease, state: str, error: str | None = None) -> bool:
        """Set a credential's state and last error under the lease (fenced).

        Returns:
            Whether the lease was still ours.
        """
        with self._conn.tx() as cur:
            cur.execute(
                f"UPDATE tb_credential SET state = %s, last_error = %s, updated_at = {NOW}"
                " WHERE id = %s AND lease_fence = %s",
                (state, error, lease.id, lease.fence),
            )
            return cur.rowcount == 1

    def reseed(self, lease: Lease, seed: Secret, digest: str) -> Lease | None:
        """Replace the refresh token with a newly configured seed (an operator re-authorised),
        drop the access token and supersede open attempts — fenced, in one transaction.

        Returns:
            The lease with the new version, or None when fenced out.
        """
        version = lease.rt_version + 1
        rt_ct = self._sealer.seal(seed.reveal().encode(), "tb_credential", lease.id, "rt", version)
        with self._conn.tx() as cur:
            cur.execute(
                "UPDATE tb_credential SET rt_ct = %s, rt_version = %s, seed_digest = %s,"
                f" at_ct = NULL, state = 'active', last_error = NULL, updated_at = {NOW}"
                " WHERE id = %s AND lease_fence = %s AND rt_version = %s",
                (rt_ct, version, digest, lease.id, lease.fence, lease.rt_version),
            )
            changed = cur.rowcount
            if changed == 1:
                cur.execute(
                    f"UPDATE tb_attempt SET status = 'superseded', finished_at = {NOW}"
                    " WHERE credential_id = %s AND status = ANY(%s)",
                    (lease.id, list(OPEN_STATUSES)),
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
        count = 0
        with self._conn.tx() as cur:
            for table, key, column, name, version in SEALED:
                cur.execute(
                    f"SELECT {key}, {column}, {version or 'NULL'} FROM {table}"
                    f" WHERE {column} IS NOT NULL FOR UPDATE"
                )
                for row_key, blob, row_version in cur.fetchall():
                    fresh = self._sealer.reseal(bytes(blob), table, str(row_key), name, row_version)
                    if fresh is None:
                        continue
                    cur.execute(
                        f"UPDATE {table} SET {column} = %s WHERE {key} = %s", (fresh, row_key)
                    )
                    count += 1
        return count

    def stale_secrets(self) -> list[str]:
        """Rows with a ciphertext not under the primary key, as ``table/key`` items (secret-free,
        ordered by table then key)."""
        found: dict[str, None] = {}
        with self._conn.tx() as cur:
            for table, key, column, _, _ in SEALED:
                cur.execute(
                    f"SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL ORDER BY {key}"
                )
                for row_key, blob in cur.fetchall():
                    if self._sealer.keyring.needs_rotation(bytes(blob)):
                        found[f"{table}/{row_key}"] = None
        return list(found)

    def reseal_row(self, item: str) -> int:
        """Re-encrypt one row's ciphertexts under the primary key, in one transaction that
        locks the row (a concurrent commit cannot slip a version in between).

        Returns:
            How many changed (0 when the row is gone or already rotated).

        Raises:
            ValueError: A malformed item name.
        """
        table, row_key = parse_item(item)
        if table == "tb_attempt" and not row_key.isdigit():
            return 0  # no attempt has such an id (and its bigint column would refuse the text)
        typed: str | int = int(row_key) if table == "tb_attempt" else row_key
        columns = [s for s in SEALED if s[0] == table]
        key = columns[0][1]
        selected = ", ".join(
            f"{column}, {version or 'NULL'}" for _, _, column, _, version in columns
        )
        count = 0
        with self._conn.tx() as cur:
            cur.execute(f"SELECT {selected} FROM {table} WHERE {key} = %s FOR UPDATE", (typed,))
            found = cur.fetchone()
            if found is None:
                return 0
            for n, (_, _, column, name, _) in enumerate(columns):
                blob, row_version = found[2 * n], found[2 * n + 1]
                if blob is None:
                    continue
                fresh = self._sealer.reseal(bytes(blob), table, row_key, name, row_version)
                if fresh is not None:
                    cur.execute(
                        f"UPDATE {table} SET {column} = %s WHERE {key} = %s", (fresh, typed)
                    )
                    count += 1
        return count

    def _check_keys(self, cur: psycopg.Cursor[Any]) -> None:
        """Refuse to open when a stored secret needs a key the keyring lacks."""
        cur.execute(ALL_SECRETS)
        self._sealer.check_keys(bytes(blob) for (blob,) in cur.fetchall())


def _one(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    row = cur.fetchone()
    assert row is not None, "a statement that always returns a row returned none"
    return tuple(row)
