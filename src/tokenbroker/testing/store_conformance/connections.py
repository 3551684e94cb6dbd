"""Conformance: several connections to one backend, reopening, schema versions.

Two stores on one backend (two processes) share commits, leases and fences; reopening keeps
the data; a newer schema is refused.
"""

from __future__ import annotations

import pytest

from tokenbroker.core.secret import Secret
from tokenbroker.errors import StoreError

from .fixtures import ConformanceBase, StoreFactory, keyring, refresh, stored

__all__ = ["ConnectionConformance"]


class ConnectionConformance(ConformanceBase):
    """Several connections, reopening and schema versions."""

    def test_two_stores_on_one_backend_see_each_other(
        self, store_factory: StoreFactory, key: str
    ) -> None:
        """Two stores opened on one backend (two processes) share commits, leases and fences."""
        self._reopenable(store_factory)
        one = store_factory.open(keyring(key))
        two = store_factory.open(keyring(key))
        try:
            lease = one.acquire("c", "prov", "one", 30)
            assert lease is not None
            assert two.acquire("c", "prov", "two", 30) is None
            attempt = one.begin_attempt(lease)
            assert one.commit(lease, attempt, stored("AT-one"), refresh_token=Secret("RT-one"))
            row = two.load("c")
            assert row is not None
            assert row.refresh_token == Secret("RT-one")
            assert (row.lease_owner, row.rt_version) == ("one", 1)
            one.release(lease)
            taken = two.acquire("c", "prov", "two", 30)
            assert taken is not None
            assert (taken.fence, taken.rt_version) == (lease.fence + 1, 1)
            assert not one.commit(lease, None, stored("AT-stale"), refresh_token=Secret("RT-stale"))
            assert one.load("c").lease_owner == "two"  # type: ignore[union-attr]
        finally:
            one.close()
            two.close()

    def test_reopening_keeps_the_data(self, store_factory: StoreFactory, key: str) -> None:
        """Opening the same store again (a migration run on a current schema) keeps every row."""
        self._reopenable(store_factory)
        first = store_factory.open(keyring(key))
        try:
            refresh(first, "c", "me", "RT-1", "AT-1")
            first.add_consumer("etl", "a" * 64, ["svc"])
            second = store_factory.open(keyring(key))
            try:
                row = second.load("c")
                assert row is not None and row.refresh_token == Secret("RT-1")
                assert len(second.attempts("c")) == 1
                assert [c[0] for c in second.consumers()] == ["etl"]
            finally:
                second.close()
        finally:
            first.close()

    def test_newer_schema_is_refused(self, store_factory: StoreFactory, key: str) -> None:
        """A store written by a newer tokenbroker (schema 99) is refused with a StoreError naming
        it, and left as it is."""
        self._reopenable(store_factory)
        store = store_factory.open(keyring(key))
        try:
            store.raw().write("tb_meta", "schema_version", "value", "99")
            with pytest.raises(StoreError, match="schema version 99"):
                store_factory.open(keyring(key))
            assert store.raw().read("tb_meta", "schema_version", "value") == "99"
        finally:
            store.close()
