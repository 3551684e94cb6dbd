"""The SQLite backend's consumers (:class:`~.base.ConsumerStore`) and delegation signing
keys (:class:`~.base.SigningKeyStore`).

Consumers are stored as digests, never keys; every add or remove gives ``tb_meta``'s
``consumers_version`` a new random value in the same transaction, which servers poll.
Signing keys are sealed by :mod:`.sealing` like every other secret column.
"""

from __future__ import annotations

import json
import secrets
import sqlite3

from ..errors import StoreError
from .sealing import Sealer
from .sqlite_connection import SQLiteConnection
from .sqlite_schema import NOW

__all__ = ["SQLiteConsumers"]


class SQLiteConsumers:
    """The consumer and signing-key half of :class:`~.sqlite.SQLiteStore` (a mixin: the
    store provides ``_conn``, ``_db`` and ``_sealer``)."""

    _conn: SQLiteConnection
    _db: sqlite3.Connection
    _sealer: Sealer

    def add_consumer(self, name: str, key_sha256: str, allow: list[str]) -> None:
        """Store a consumer: its name, the SHA-256 of its key (never the key), its rules.

        Raises:
            StoreError: When the name exists already (or the store fails).
        """
        with self._conn.tx():
            taken = self._db.execute(
                "SELECT 1 FROM tb_consumer WHERE name = ? OR key_sha256 = ?", (name, key_sha256)
            ).fetchone()
            if taken:
                raise StoreError(f"a consumer named {name!r} exists already")
            self._db.execute(
                "INSERT INTO tb_consumer (name, key_sha256, allow, created_at)"
                f" VALUES (?, ?, ?, {NOW})",
                (name, key_sha256, json.dumps(allow)),
            )
            self._consumers_changed()

    def remove_consumer(self, name: str) -> bool:
        """Delete a stored consumer; running servers refuse its key within a second
        (they follow :meth:`consumers_version`).

        Returns:
            Whether it existed.
        """
        with self._conn.tx():
            removed = self._db.execute("DELETE FROM tb_consumer WHERE name = ?", (name,)).rowcount
            if removed:
                self._consumers_changed()
            return removed == 1

    def consumers_version(self) -> str:
        """A value that changes whenever a stored consumer is added or removed (one row read:
        servers poll it to notice changes made by other processes)."""
        with self._conn.guard():
            row = self._db.execute(
                "SELECT value FROM tb_meta WHERE name = 'consumers_version'"
            ).fetchone()
        return str(row[0]) if row else ""

    def _consumers_changed(self) -> None:
        """Give :meth:`consumers_version` a new value (inside the caller's transaction). Random,
        not a counter: equal values mean the same consumers, even across a restored backup."""
        self._db.execute(
            "INSERT INTO tb_meta (name, value) VALUES ('consumers_version', ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (secrets.token_hex(16),),
        )

    def consumers(self) -> list[tuple[str, str, list[str]]]:
        """Every stored consumer as ``(name, key digest, allow rules)``."""
        with self._conn.guard():
            rows = self._db.execute(
                "SELECT name, key_sha256, allow FROM tb_consumer ORDER BY name"
            ).fetchall()
        return [(name, digest, list(json.loads(allow))) for name, digest, allow in rows]

    def signing_keys(self, algorithm: str) -> list[tuple[str, bytes]]:
        """The delegation signing keys for ``algorithm`` as ``(kid, private PEM)``, newest first."""
        with self._conn.guard():
            rows = self._db.execute(
                "SELECT kid, private_ct FROM tb_signing_key WHERE algorithm = ?"
                " ORDER BY created_at DESC, kid",
                (algorithm,),
            ).fetchall()
        return [
            (kid, self._sealer.open(blob, "tb_signing_key", kid, "private")) for kid, blob in rows
        ]

    def add_signing_key(self, kid: str, algorithm: str, private_pem: bytes) -> None:
        """Store a delegation signing key, encrypted; a no-op if ``kid`` exists."""
        blob = self._sealer.seal(private_pem, "tb_signing_key", kid, "private")
        with self._conn.tx():
            self._db.execute(
                "INSERT INTO tb_signing_key (kid, algorithm, private_ct, created_at)"
                f" VALUES (?, ?, ?, {NOW}) ON CONFLICT (kid) DO NOTHING",
                (kid, algorithm, blob),
            )
