"""Encryption at rest: AES-256-GCM with a key id per ciphertext and row-bound associated data.

A :class:`Keyring` holds the configured ``encryption_keys``: the first one
encrypts, all of them decrypt (rotation). Every ciphertext starts with a
version byte and the 8-byte id of the key that made it, so a missing key is
named precisely and no trial decryption is needed. The associated data binds
a ciphertext to its table, row, column and version: a ciphertext copied to
another row or column fails to decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import EncryptionKeyError, StoreCorruptError
from .secret import Secret

__all__ = ["KEY_FORMAT", "Keyring", "decode_key", "generate_key"]

_VERSION = b"\x01"
_ID_BYTES = 8
_NONCE_BYTES = 12
#: What a key must be; errors say this and the key's position, never the key.
KEY_FORMAT = "is not 32 bytes of URL-safe base64 (generate one with `tokenbroker keygen`)"


def generate_key() -> str:
    """A new key: 32 random bytes, URL-safe base64 (what ``tokenbroker keygen`` prints).

    Returns:
        The encoded key.
    """
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def decode_key(text: str) -> bytes:
    """The 32 bytes of an encoded key.

    Raises:
        ValueError: :data:`KEY_FORMAT`, when ``text`` is not 32 bytes of URL-safe base64.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(KEY_FORMAT)
    return raw


class Keyring:
    """The configured encryption keys.

    Args:
        keys: Encoded keys; the first encrypts, all decrypt.

    Raises:
        EncryptionKeyError: When no key is given or one is not 32 bytes of URL-safe base64.
    """

    def __init__(self, keys: Iterable[Secret]) -> None:
        self._ciphers: dict[bytes, AESGCM] = {}
        self._primary = b""
        for position, key in enumerate(keys):
            try:
                raw = decode_key(key.reveal())
            except ValueError:
                raise EncryptionKeyError(f"key {position} {KEY_FORMAT}") from None
            key_id = hashlib.sha256(raw).digest()[:_ID_BYTES]
            self._ciphers.setdefault(key_id, AESGCM(raw))
            if position == 0:
                self._primary = key_id
        if not self._ciphers:
            raise EncryptionKeyError("no encryption key configured (encryption_keys)")

    def __repr__(self) -> str:
        return f"Keyring(keys={len(self._ciphers)}, primary={self._primary.hex()})"

    @property
    def primary_id(self) -> str:
        """Hex id of the key that encrypts."""
        return self._primary.hex()

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt with the primary key.

        Args:
            plaintext: What to protect.
            aad: Associated data naming where the ciphertext lives.

        Returns:
            ``version | key id | nonce | ciphertext+tag``.
        """
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self._primary].encrypt(nonce, plaintext, aad)
        return _VERSION + self._primary + nonce + sealed

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a value made by :meth:`encrypt` with any configured key.

        Args:
            blob: The stored ciphertext.
            aad: The same associated data it was sealed with.

        Returns:
            The plaintext.

        Raises:
            EncryptionKeyError: The key that made it is not configured.
            StoreCorruptError: Malformed, tampered with, or moved to another row/column.
        """
        key_id = self.key_id(blob)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise EncryptionKeyError(
                f"a stored secret is encrypted with key {key_id.hex()}, which is not among "
                "encryption_keys"
            )
        start = 1 + _ID_BYTES
        try:
            return cipher.decrypt(
                blob[start : start + _NONCE_BYTES], blob[start + _NONCE_BYTES :], aad
            )
        except InvalidTag:
            raise StoreCorruptError("a stored secret failed its integrity check") from None

    def needs_rotation(self, blob: bytes) -> bool:
        """Whether ``blob`` was made by a key other than the primary one."""
        return self.key_id(blob) != self._primary

    def knows(self, blob: bytes) -> bool:
        """Whether the key that made ``blob`` is configured."""
        return self.key_id(blob) in self._ciphers

    @staticmethod
    def key_id(blob: bytes) -> bytes:
        """The id of the key that made ``blob``.

        Raises:
            StoreCorruptError: When ``blob`` is not one of our ciphertexts.
        """
        if len(blob) < 1 + _ID_BYTES + _NONCE_BYTES + 16 or blob[:1] != _VERSION:
            raise StoreCorruptError("a stored secret is not a valid ciphertext")
        return bytes(blob[1 : 1 + _ID_BYTES])
