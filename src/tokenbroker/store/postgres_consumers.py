"""The PostgreSQL backend's consumers (:class:`~.base.ConsumerStore`) and delegation
signing keys (:class:`~.base.SigningKeyStore`).

Consumers are stored as digests, never keys; every add or remove gives ``tb_meta``'s
``consumers_version`` a new random value in the same transaction, which every replica polls.
Signing keys are sealed by :mod:`.sealing` like every other secret column.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import psycopg

from ..errors import StoreError
from .postgres_connection import PostgresConnection
from .postgres_schema import NOW
from .sealing import Sealer

__all__ = ["PostgresConsumers"]


class PostgresConsumers:
    """The consumer and signing-key half of :class:`~.postgres.PostgresStore` (a mixin: the
    store provides ``_conn`` and ``_sealer``)."""

    _conn: PostgresConnection
    _sealer: Sealer

    def add_consumer(self, name: str, key_sha256: str, allow: list[str]) -> None:
        """Store a consumer: its name, the SHA-256 of its key (never the key), its rules.

        Raises:
            StoreError: When the name or key digest exists already (or the store fails).
        """
        with self._conn.tx() as cur:
            cur.execute(
                "INSERT INTO tb_consumer (name, key_sha256, allow, created_at)"
                f" VALUES (%s, %s, %s, {NOW}) ON CONFLICT DO NOTHING",
                (name, key_sha256, json.dumps(allow)),
            )
            if cur.rowcount != 1:
                raise StoreError(f"a consumer named {name!r} (or with that key) exists already")
            self._consumers_changed(cur)

    def remove_consumer(self, name: str) -> bool:
        """Delete a stored consumer; every replica refuses its key once it sees
        :meth:`consumers_version` change.

        Returns:
            Whether it existed.
        """
        with self._conn.tx() as cur:
            cur.execute("DELETE FROM tb_consumer WHERE name = %s", (name,))
            removed = cur.rowcount == 1
            if removed:
                self._consumers_changed(cur)
        return removed

    def consumers_version(self) -> str:
        """A value that changes whenever a stored consumer is added or removed (one row read:
        replicas poll it to notice each other's changes)."""
        with self._conn.tx() as cur:
            cur.execute("SELECT value FROM tb_meta WHERE name = 'consumers_version'")
            row = cur.fetchone()
        return str(row[0]) if row else ""

    @staticmethod
    def _consumers_changed(cur: psycopg.Cursor[Any]) -> None:
        """Give :meth:`consumers_version` a new random value in the caller's transaction
        (random, not a counter: equal values mean the same consumers, even across a backup)."""
        cur.execute(
            "INSERT INTO tb_meta (name, value) VALUES ('consumers_version', %s)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (secrets.token_hex(16),),
        )

    def consumers(self) -> list[tuple[str, str, list[str]]]:
        """Every stored consumer as ``(name, key digest, allow rules)``, by name."""
        with self._conn.tx() as cur:
            cur.execute("SELECT name, key_sha256, allow FROM tb_consumer ORDER BY name")
            rows = cur.fetchall()
        return [(name, digest, list(json.loads(allow))) for name, digest, allow in rows]

    def signing_keys(self, algorithm: str) -> list[tuple[str, bytes]]:
        """The delegation signing keys for ``algorithm`` as ``(kid, private PEM)``, newest first."""
        with self._conn.tx() as cur:
            cur.execute(
                "SELECT kid, private_ct FROM tb_signing_key WHERE algorithm = %s"
                " ORDER BY created_at DESC, kid",
                (algorithm,),
            )
            rows = cur.fetchall()
        return [
            (kid, self._sealer.open(bytes(blob), "tb_signing_key", kid, "private"))
            for kid, blob in rows
        ]

    def add_signing_key(self, kid: str, algorithm: str, private_pem: bytes) -> None:
        """Store a delegation signing key, encrypted; a no-op if ``kid`` exists."""
        blob = self._sealer.seal(private_pem, "tb_signing_key", kid, "private")
        with self._conn.tx() as cur:
            cur.execute(
                "INSERT INTO tb_signing_key (kid, algorithm, private_ct, created_at)"
                f" VALUES (%s, %s, %s, {NOW}) ON CONFLICT (kid) DO NOTHING",
                (kid, algorithm, blob),
            )
