"""Conformance: encryption at rest, keys and key rotation (checklist D6).

A ciphertext moved to another row, column or version fails to decrypt; no plaintext canary
is in what the backend persists; a wrong key fails closed; rotation re-encrypts everything.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.secret import Secret
from tokenbroker.errors import EncryptionKeyError, StoreCorruptError
from tokenbroker.store import RawState, Store

from .fixtures import ConformanceBase, StoreFactory, keyring, refresh, stored

__all__ = ["EncryptionConformance"]

_CRED = "tb_credential"


def _copy(column: str, source: str, target: str = "beta") -> Callable[[RawState], None]:
    return lambda raw: raw.write(_CRED, target, column, raw.read(_CRED, source, column))


def _move(source: str, target: str) -> Callable[[RawState], None]:
    return lambda raw: raw.write(_CRED, "beta", target, raw.read(_CRED, "beta", source))


def _shift(column: str, by: int) -> Callable[[RawState], None]:
    return lambda raw: raw.write(_CRED, "beta", column, raw.read(_CRED, "beta", column) + by)


_SWAPS = {
    "rt-other-row": _copy("rt_ct", "alpha"),
    "at-other-row": _copy("at_ct", "alpha"),
    "at-into-rt": _move("at_ct", "rt_ct"),
    "rt-into-at": _move("rt_ct", "at_ct"),
    "rt-version": _shift("rt_version", 1),
    "at-version": _shift("at_version", -1),
}


class EncryptionConformance(ConformanceBase):
    """Encryption at rest, wrong keys and key rotation."""

    @pytest.mark.parametrize("swap", list(_SWAPS))
    def test_moved_ciphertext_fails_to_decrypt(self, store: Store, swap: str) -> None:
        """A ciphertext moved to another row, column or version is StoreCorruptError on load."""
        refresh(store, "alpha", "A", "RT-alpha-1", "AT-alpha-1")
        refresh(store, "beta", "A", "RT-beta-1", "AT-beta-1")
        _SWAPS[swap](store.raw())
        with pytest.raises(StoreCorruptError) as excinfo:
            store.load("beta")
        assert "RT-" not in str(excinfo.value)
        assert store.load("alpha") is not None

    def test_rolled_back_refresh_token_fails_to_decrypt(self, store: Store) -> None:
        """Putting back an older refresh-token ciphertext under the current version is refused."""
        refresh(store, "c", "A", "RT-1", "AT-1")
        old_ct = store.raw().read(_CRED, "c", "rt_ct")
        refresh(store, "c", "A", "RT-2", "AT-2")
        store.raw().write(_CRED, "c", "rt_ct", old_ct)
        with pytest.raises(StoreCorruptError):
            store.load("c")

    def test_corrupted_ciphertext_is_store_corrupt(self, store: Store) -> None:
        """Random bytes in rt_ct make load() raise StoreCorruptError; states() still works."""
        refresh(store, "c", "A", "RT-1", "AT-1")
        refresh(store, "d", "A", "RT-d", "AT-d")
        store.raw().write(_CRED, "c", "rt_ct", b"\x7f" + b"\x5a" * 80)
        with pytest.raises(StoreCorruptError):
            store.load("c")
        assert store.load("d") is not None
        assert [s["id"] for s in store.states()] == ["c", "d"]

    def test_tampered_ciphertext_byte_is_store_corrupt(self, store: Store) -> None:
        """One flipped bit in a stored ciphertext is StoreCorruptError, never a wrong token."""
        refresh(store, "c", "A", "RT-1", "AT-1")
        flipped = bytearray(store.raw().read(_CRED, "c", "at_ct"))
        flipped[-1] ^= 0x01
        store.raw().write(_CRED, "c", "at_ct", bytes(flipped))
        with pytest.raises(StoreCorruptError):
            store.load("c")

    def test_no_plaintext_canary_in_what_the_backend_persists(self, store: Store) -> None:
        """After commits carrying canaries, no canary appears in the backend's persisted bytes."""
        canaries = [f"CANARY_{kind}_{uuid.uuid4().hex}" for kind in ("AT", "RT", "SEED", "RAW")]
        at, rt, seed, raw = canaries
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        lease = store.reseed(lease, Secret(seed), "digest")
        assert lease is not None
        attempt = store.begin_attempt(lease)
        body = f'{{"access_token":"{at}","refresh_token":"{rt}","x":"{raw}"}}'.encode()
        assert store.commit(lease, attempt, stored(at), refresh_token=Secret(rt), raw=body)
        store.add_signing_key("kid", "EdDSA", f"PEM {seed}".encode())
        data = store.raw().persisted()
        assert b"digest" in data  # the hook does show what the backend keeps
        for canary in canaries:
            assert canary.encode() not in data, canary

    # -- D6: keys and rotation -------------------------------------------------------------------

    def test_wrong_key_fails_closed_at_open(self, store_factory: StoreFactory, key: str) -> None:
        """Reopening sealed rows with only an unrelated key is EncryptionKeyError naming the key
        id, never a key or a token."""
        self._reopenable(store_factory)
        new = generate_key()
        store = store_factory.open(keyring(key))
        refresh(store, "c", "A", "RT-1", "AT-1")
        try:
            with pytest.raises(EncryptionKeyError) as excinfo:
                store_factory.open(keyring(new))
        finally:
            store.close()
        message = str(excinfo.value)
        assert keyring(key).primary_id in message
        assert key not in message
        assert new not in message
        assert "RT-1" not in message

    def test_empty_store_opens_with_any_key(self, store_factory: StoreFactory) -> None:
        """A store holding no secrets yet does not pin a key."""
        self._reopenable(store_factory)
        first = store_factory.open(keyring(generate_key()))
        try:
            store_factory.open(keyring(generate_key())).close()
        finally:
            first.close()

    def test_key_rotation_re_encrypts_everything(self, store_factory: StoreFactory) -> None:
        """With [new, old] the store opens, rotate_keys re-encrypts all, then [new] alone suffices
        and [old] alone no longer opens it."""
        self._reopenable(store_factory)
        old, new = generate_key(), generate_key()
        first = store_factory.open(keyring(old))
        try:
            refresh(first, "c", "A", "RT-1", "AT-1", raw=b"reply-1")
            first.add_signing_key("kid", "EdDSA", b"PEM")
            both = store_factory.open(keyring(new, old))
            try:
                assert both.rotate_keys() == 4  # at_ct, rt_ct, raw_ct, private_ct
                assert both.rotate_keys() == 0
                refresh(both, "c", "A", "RT-2", "AT-2", raw=b"reply-2")
                hook = both.raw()
                blobs = [hook.read(_CRED, "c", "at_ct"), hook.read(_CRED, "c", "rt_ct")]
                blobs += [hook.read("tb_signing_key", "kid", "private_ct")]
                blobs += [hook.read("tb_attempt", a.id, "raw_ct") for a in both.attempts("c")]
            finally:
                both.close()
            assert {Keyring.key_id(b).hex() for b in blobs} == {keyring(new).primary_id}
            only_new = store_factory.open(keyring(new))
            try:
                row = only_new.load("c")
                assert only_new.signing_keys("EdDSA") == [("kid", b"PEM")]
            finally:
                only_new.close()
            assert row is not None and row.token is not None
            assert row.refresh_token == Secret("RT-2")
            assert row.token.token.access_token == "AT-2"
            with pytest.raises(EncryptionKeyError):
                store_factory.open(keyring(old))
        finally:
            first.close()

    def test_rotation_keeps_the_same_tokens(self, store_factory: StoreFactory) -> None:
        """rotate_keys changes ciphertexts only: load() returns the very same tokens afterwards."""
        self._reopenable(store_factory)
        old, new = generate_key(), generate_key()
        first = store_factory.open(keyring(old))
        try:
            refresh(first, "c", "A", "RT-1", "AT-1")
            both = store_factory.open(keyring(new, old))
            try:
                assert both.rotate_keys() == 3  # at_ct, rt_ct and the attempt's (empty) raw_ct
            finally:
                both.close()
            only_new = store_factory.open(keyring(new))
            try:
                row = only_new.load("c")
            finally:
                only_new.close()
        finally:
            first.close()
        assert row is not None
        assert row.refresh_token == Secret("RT-1")
        assert row.token is not None
        assert row.token.token.access_token == "AT-1"
        assert row.rt_version == 1
