"""Conformance: stored consumers and delegation signing keys.

Consumers are kept by name with the SHA-256 of their key and their rules, and changes are
visible to other connections; signing keys are sealed, newest first, never replaced.
"""

from __future__ import annotations

import time

import pytest

from tokenbroker.errors import StoreError
from tokenbroker.store import Store

from .fixtures import ConformanceBase, StoreFactory, keyring

__all__ = ["ConsumerConformance"]


class ConsumerConformance(ConformanceBase):
    """Consumers and signing keys."""

    def test_consumers_add_list_remove(self, store: Store) -> None:
        """Consumers are listed by name with their rules; a duplicate changes nothing."""
        store.add_consumer("etl", "a" * 64, ["svc", "tdx:read"])
        store.add_consumer("batch", "b" * 64, ["svc"])
        marker = store.consumers_version()
        with pytest.raises(StoreError, match="etl"):
            store.add_consumer("etl", "c" * 64, ["other"])
        with pytest.raises(StoreError):
            store.add_consumer("other", "a" * 64, ["other"])
        assert store.consumers_version() == marker
        assert store.consumers() == [
            ("batch", "b" * 64, ["svc"]),
            ("etl", "a" * 64, ["svc", "tdx:read"]),
        ]
        assert store.remove_consumer("etl")
        assert not store.remove_consumer("etl")
        assert store.consumers() == [("batch", "b" * 64, ["svc"])]

    def test_consumers_version_changes_with_each_stored_change_and_only_then(
        self, store_factory: StoreFactory, store: Store, key: str
    ) -> None:
        """Adding and removing a consumer give consumers_version a new value that another
        connection (another process) sees; a refused add or a remove of nobody leaves it."""
        self._reopenable(store_factory)
        other = store_factory.open(keyring(key))
        try:
            seen = [other.consumers_version()]
            store.add_consumer("etl", "a" * 64, ["svc"])
            seen.append(other.consumers_version())
            with pytest.raises(StoreError):
                store.add_consumer("etl", "b" * 64, ["svc"])
            assert not store.remove_consumer("nobody")
            assert other.consumers_version() == seen[-1]
            assert store.remove_consumer("etl")
            seen.append(other.consumers_version())
        finally:
            other.close()
        assert len(set(seen)) == 3

    def test_signing_keys_are_sealed_newest_first_and_never_replaced(self, store: Store) -> None:
        """Signing keys come back newest first per algorithm; adding a kid again keeps the first."""
        added = store.now()
        store.add_signing_key("k1", "EdDSA", b"PEM-CANARY-1")
        deadline = time.monotonic() + 5
        while store.now() < added + 0.01:  # the next key's created_at must be later
            assert time.monotonic() < deadline, "the store's clock did not move"
            time.sleep(0.002)
        store.add_signing_key("k2", "EdDSA", b"PEM-2")
        store.add_signing_key("k1", "EdDSA", b"PEM-replaced")
        store.add_signing_key("p1", "ES256", b"PEM-p")
        assert store.signing_keys("EdDSA") == [("k2", b"PEM-2"), ("k1", b"PEM-CANARY-1")]
        assert store.signing_keys("ES256") == [("p1", b"PEM-p")]
        assert b"PEM-CANARY" not in store.raw().read("tb_signing_key", "k1", "private_ct")
