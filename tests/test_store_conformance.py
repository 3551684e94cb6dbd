"""The store conformance suite (tokenbroker.testing.store_conformance) against every backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenbroker.core.crypto import Keyring
from tokenbroker.store import open_store
from tokenbroker.store.memory import MemoryState, MemoryStore
from tokenbroker.testing.store_conformance import StoreConformance, StoreFactory


@pytest.fixture(params=["sqlite-file", "sqlite-memory", "memory", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Each backend open_store knows (postgres: a fresh database on the session's own server)."""
    if request.param == "postgres":
        pg_url = request.getfixturevalue("pg_url")
        return StoreFactory("postgres", lambda keys: open_store(pg_url, keys))
    if request.param == "sqlite-file":
        url = f"sqlite:///{tmp_path / 'conformance.db'}"
        return StoreFactory("sqlite-file", lambda keys: open_store(url, keys))
    if request.param == "sqlite-memory":
        return StoreFactory(
            "sqlite-memory", lambda keys: open_store("sqlite:///:memory:", keys), reopenable=False
        )
    state = MemoryState()  # what a second "connection" to the same memory store shares

    def memory(keys: Keyring) -> MemoryStore:
        return MemoryStore(keys, state=state)

    return StoreFactory("memory", memory)


class TestStoreConformance(StoreConformance):
    """Every guarantee of the store protocol, against every backend."""
