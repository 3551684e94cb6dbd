"""Encryption at rest, shared by every store backend (checklist D6).

Every secret column holds AES-GCM ciphertext (:mod:`tokenbroker.core.crypto`) whose associated
data names its place: ``table|row|column[|version]``. A ciphertext copied to another row,
another column, or put back under another version fails to decrypt (StoreCorruptError)
instead of yielding a token that belongs elsewhere. Backends keep rows as plain mappings
with the column names of :data:`SEALED`; this module turns them into
:class:`~tokenbroker.store.rows.CredentialRow` objects and back, so no backend carries its
own copy of the encryption.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.crypto import Keyring
from ..core.secret import Secret
from ..core.token import Token
from .rows import CredentialRow, StoredToken

__all__ = ["KEY_COLUMNS", "SEALED", "Sealer", "aad", "parse_item"]

#: Every sealed column: (table, key column, ciphertext column, AAD column name, version column).
SEALED: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("tb_credential", "id", "at_ct", "at", "at_version"),
    ("tb_credential", "id", "rt_ct", "rt", "rt_version"),
    ("tb_signing_key", "kid", "private_ct", "private", None),
    ("tb_attempt", "id", "raw_ct", "raw", None),
)

#: The key column of every table a backend keeps (the names the raw test hook uses).
KEY_COLUMNS = {
    "tb_credential": "id",
    "tb_attempt": "id",
    "tb_consumer": "name",
    "tb_signing_key": "kid",
    "tb_meta": "name",
    "tb_job": "id",
}


def parse_item(item: str) -> tuple[str, str]:
    """Split a key-rotation item (``table/key``, from ``stale_secrets``) into its parts.

    Raises:
        ValueError: When the table is not one with sealed columns, or the key is empty.
    """
    table, sep, key = item.partition("/")
    if not sep or not key or table not in {t for t, *_ in SEALED}:
        raise ValueError("a key-rotation item is TABLE/KEY of a table with sealed columns")
    return table, key


def aad(table: str, row: str, column: str, version: int | None = None) -> bytes:
    """The associated data binding a ciphertext to its place.

    Args:
        table: The table (``tb_credential``, ``tb_attempt``, ``tb_signing_key``).
        row: The row's key, as text.
        column: The short column name (``at``, ``rt``, ``raw``, ``private``).
        version: The row's version of that column, when it has one.

    Returns:
        ``table|row|column`` with ``|version`` appended when given.
    """
    suffix = "" if version is None else f"|{version}"
    return f"{table}|{row}|{column}{suffix}".encode()


class Sealer:
    """Seals and opens a backend's secret columns with one keyring.

    Args:
        keyring: The first key encrypts, every key decrypts.
    """

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def __repr__(self) -> str:
        return f"Sealer(primary={self.keyring.primary_id!r})"

    def seal(
        self, plain: bytes | None, table: str, row: str, column: str, version: int | None = None
    ) -> bytes | None:
        """Encrypt one value for one place (None stays None).

        Returns:
            The ciphertext under the primary key, or None.
        """
        if plain is None:
            return None
        return self.keyring.encrypt(plain, aad(table, row, column, version))

    def open(
        self, blob: bytes, table: str, row: str, column: str, version: int | None = None
    ) -> bytes:
        """Decrypt one value, checking that it belongs to this place.

        Raises:
            StoreCorruptError: The ciphertext is damaged or belongs elsewhere.
            EncryptionKeyError: It was made with a key the keyring lacks.
        """
        return self.keyring.decrypt(blob, aad(table, row, column, version))

    def reseal(
        self, blob: bytes, table: str, row: str, column: str, version: int | None = None
    ) -> bytes | None:
        """Re-encrypt a ciphertext under the primary key (key rotation).

        Returns:
            The new ciphertext, or None when it is under the primary key already.
        """
        if not self.keyring.needs_rotation(blob):
            return None
        place = aad(table, row, column, version)
        return self.keyring.encrypt(self.keyring.decrypt(blob, place), place)

    def check_keys(self, blobs: Iterable[bytes]) -> None:
        """Fail closed when a stored secret was made with a key the keyring lacks.

        Raises:
            EncryptionKeyError: Naming the missing key's id, never a key.
            StoreCorruptError: A blob is not a ciphertext at all.
        """
        for blob in blobs:
            if not self.keyring.knows(blob):
                self.keyring.decrypt(blob, b"")  # raises EncryptionKeyError naming the key id

    def seal_access_token(self, token: Token, row: str, version: int) -> bytes:
        """The ``at_ct`` of a credential row: the token's value, type and scope, sealed.

        Args:
            token: The access token.
            row: The credential row's id.
            version: The row's new ``at_version``.

        Returns:
            The ciphertext.
        """
        plain = json.dumps(
            {
                "access_token": token.access_token,
                "token_type": token.token_type,
                "scope": token.scope,
            }
        ).encode()
        return self.keyring.encrypt(plain, aad("tb_credential", row, "at", version))

    def credential(self, row: Mapping[str, Any]) -> CredentialRow:
        """Decrypt one stored credential row (a mapping of ``tb_credential`` columns).

        Raises:
            StoreCorruptError: A ciphertext fails its integrity check.
            EncryptionKeyError: A ciphertext needs a key the keyring lacks.
        """
        token = None
        if row["at_ct"] is not None:
            plain = json.loads(
                self.open(row["at_ct"], "tb_credential", row["id"], "at", row["at_version"])
            )
            token = StoredToken(
                token=Token(
                    access_token=plain["access_token"],
                    token_type=plain["token_type"],
                    expires_at=row["at_expires_at"],
                    scope=plain["scope"],
                ),
                lifetime=row["at_lifetime"],
                obtained_at=row["at_obtained_at"],
                fingerprint=row["fingerprint"],
            )
        refresh = None
        if row["rt_ct"] is not None:
            value = self.open(row["rt_ct"], "tb_credential", row["id"], "rt", row["rt_version"])
            refresh = Secret(value.decode())
        return CredentialRow(
            id=row["id"],
            provider=row["provider"],
            token=token,
            refresh_token=refresh,
            rt_version=row["rt_version"],
            seed_digest=row["seed_digest"],
            state=row["state"],
            last_error=row["last_error"],
            last_refresh=row["last_refresh"],
            lease_owner=row["lease_owner"],
            lease_fence=row["lease_fence"],
            lease_expires_at=row["lease_expires_at"],
        )
