"""Keyring: AES-256-GCM round trips, row-bound associated data, key ids, rotation, bad keys."""

from __future__ import annotations

import base64

import pytest

from tokenbroker import EncryptionKeyError, Secret, StoreCorruptError
from tokenbroker.core.crypto import Keyring, generate_key

AAD = b"tb_credential|svc|rt|1"
HEADER = 1 + 8  # version byte + key id
NONCE = 12


def ring(*keys: str) -> Keyring:
    return Keyring([Secret(k) for k in keys])


def test_round_trip() -> None:
    """What is encrypted under some associated data decrypts to the same bytes under it."""
    keyring = ring(generate_key())
    for plain in (b"", b"CANARY_RT_1", bytes(range(256)) * 40):
        blob = keyring.encrypt(plain, AAD)
        assert plain not in blob or plain == b""
        assert keyring.decrypt(blob, AAD) == plain


@pytest.mark.parametrize(
    "other",
    [
        b"tb_credential|other|rt|1",  # another row
        b"tb_credential|svc|at|1",  # another column
        b"tb_credential|svc|rt|2",  # another version
        b"tb_attempt|svc|rt|1",  # another table
        b"",
    ],
)
def test_other_associated_data_fails(other: bytes) -> None:
    """A ciphertext presented under another row, column, version or table fails its check."""
    keyring = ring(generate_key())
    blob = keyring.encrypt(b"CANARY_RT_2", AAD)
    with pytest.raises(StoreCorruptError) as excinfo:
        keyring.decrypt(blob, other)
    assert "CANARY" not in str(excinfo.value)


def test_every_tampered_byte_fails() -> None:
    """Flipping any byte of the nonce, ciphertext or tag is detected (no silent corruption)."""
    keyring = ring(generate_key())
    blob = keyring.encrypt(b"CANARY_RT_3", AAD)
    for index in range(HEADER, len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(StoreCorruptError):
            keyring.decrypt(bytes(tampered), AAD)


def test_malformed_blobs_are_corrupt() -> None:
    """A wrong version byte, a truncated blob or no blob at all is StoreCorruptError, not a crash."""
    keyring = ring(generate_key())
    blob = keyring.encrypt(b"x", AAD)
    for bad in (b"\x02" + blob[1:], blob[: HEADER + NONCE + 15], b"", b"plain text value"):
        with pytest.raises(StoreCorruptError):
            keyring.decrypt(bad, AAD)
        with pytest.raises(StoreCorruptError):
            Keyring.key_id(bad)


def test_unknown_key_names_its_id_and_no_key_material() -> None:
    """A ciphertext from a key we lack raises EncryptionKeyError naming the key id, never a key."""
    old, new = generate_key(), generate_key()
    blob = ring(old).encrypt(b"CANARY_RT_4", AAD)
    with pytest.raises(EncryptionKeyError) as excinfo:
        ring(new).decrypt(blob, AAD)
    message = str(excinfo.value)
    assert ring(old).primary_id in message
    assert len(ring(old).primary_id) == 16
    for key in (old, new):
        raw = base64.urlsafe_b64decode(key)
        for form in (key, key.rstrip("="), raw.hex(), base64.b64encode(raw).decode()):
            assert form not in message
            assert form not in repr(excinfo.value)
    assert "CANARY" not in message


def test_flipped_key_id_is_an_unknown_key() -> None:
    """A ciphertext whose key id was altered is refused (as a missing key), never decrypted."""
    keyring = ring(generate_key())
    blob = bytearray(keyring.encrypt(b"x", AAD))
    blob[1] ^= 0xFF
    with pytest.raises(EncryptionKeyError):
        keyring.decrypt(bytes(blob), AAD)
    assert not keyring.knows(bytes(blob))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (base64.urlsafe_b64encode(b"k" * 16).decode(), "16 bytes"),
        (base64.urlsafe_b64encode(b"k" * 33).decode(), "33 bytes"),
        ("not base64 at all!", "not base64"),
        ("", "empty"),
        ("é" * 44, "not ASCII"),
        (generate_key().rstrip("="), "missing padding"),
    ],
)
def test_malformed_key_names_its_position(bad: str, reason: str) -> None:
    """A malformed key raises EncryptionKeyError naming its position, never echoing the value."""
    with pytest.raises(EncryptionKeyError) as excinfo:
        ring(generate_key(), bad)
    message = str(excinfo.value)
    assert "encryption_keys: key 1 " in message, reason
    assert excinfo.value.problems[0].path == "encryption_keys"
    if bad:
        assert bad not in message


def test_malformed_first_key_is_position_zero() -> None:
    """The position is counted from zero, so the primary key's problems say [0]."""
    with pytest.raises(EncryptionKeyError, match=r"encryption_keys: key 0 "):
        ring("short", generate_key())


def test_empty_key_list_is_refused() -> None:
    """No keys at all is EncryptionKeyError (fail closed), not a keyring that cannot encrypt."""
    with pytest.raises(EncryptionKeyError, match="no encryption key"):
        Keyring([])


def test_first_key_encrypts_and_every_key_decrypts() -> None:
    """The primary key makes new ciphertexts; older keys listed later still decrypt theirs."""
    k1, k2, k3 = generate_key(), generate_key(), generate_key()
    old_blob = ring(k1).encrypt(b"old", AAD)
    older_blob = ring(k3).encrypt(b"older", AAD)
    rotated = ring(k2, k1, k3)
    assert rotated.primary_id == ring(k2).primary_id
    assert rotated.decrypt(old_blob, AAD) == b"old"
    assert rotated.decrypt(older_blob, AAD) == b"older"
    fresh = rotated.encrypt(b"new", AAD)
    assert Keyring.key_id(fresh).hex() == ring(k2).primary_id
    assert ring(k2).decrypt(fresh, AAD) == b"new"
    with pytest.raises(EncryptionKeyError):
        ring(k1).decrypt(fresh, AAD)


def test_needs_rotation_and_knows() -> None:
    """needs_rotation is true exactly for blobs not made by the primary key; knows for any listed key."""
    k1, k2, stranger = generate_key(), generate_key(), generate_key()
    rotated = ring(k2, k1)
    by_old = ring(k1).encrypt(b"x", AAD)
    by_new = rotated.encrypt(b"x", AAD)
    by_stranger = ring(stranger).encrypt(b"x", AAD)
    assert rotated.needs_rotation(by_old)
    assert not rotated.needs_rotation(by_new)
    assert rotated.knows(by_old)
    assert rotated.knows(by_new)
    assert not rotated.knows(by_stranger)


def test_nonces_differ_for_equal_plaintexts() -> None:
    """Encrypting the same plaintext twice gives different nonces and ciphertexts."""
    keyring = ring(generate_key())
    blobs = [keyring.encrypt(b"same", AAD) for _ in range(50)]
    nonces = {blob[HEADER : HEADER + NONCE] for blob in blobs}
    assert len(nonces) == 50
    assert len(set(blobs)) == 50


def test_duplicate_keys_are_harmless() -> None:
    """Listing the same key twice still works (the first listing decides the primary)."""
    k1 = generate_key()
    keyring = ring(k1, k1)
    assert keyring.decrypt(keyring.encrypt(b"x", AAD), AAD) == b"x"


def test_repr_shows_no_key_material() -> None:
    """A keyring's repr names how many keys and the primary id, never a key."""
    k1, k2 = generate_key(), generate_key()
    text = repr(ring(k1, k2))
    assert ring(k1).primary_id in text
    assert k1 not in text
    assert k2 not in text
    assert base64.urlsafe_b64decode(k1).hex() not in text


def test_generate_key_is_32_random_bytes() -> None:
    """generate_key gives URL-safe base64 of 32 bytes, different every time."""
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert len(base64.urlsafe_b64decode(key)) == 32
