"""The store registry (tokenbroker.store): open_store picks a backend by URL scheme."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenbroker import ConfigError, StoreError, parse_settings
from tokenbroker.config import startup_problems
from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.secret import Secret
from tokenbroker.engine.credentials import store_for as open_configured
from tokenbroker.store import Backend, is_persistent, open_store, probe, register_backend, schemes
from tokenbroker.store.memory import MemoryStore
from tokenbroker.store.sqlite import SQLiteStore


def keys() -> Keyring:
    return Keyring([Secret(generate_key())])


@pytest.mark.parametrize(
    ("url", "kind", "persistent"),
    [
        ("memory", MemoryStore, False),
        ("memory://", MemoryStore, False),
        ("sqlite:///:memory:", SQLiteStore, False),
        ("sqlite:///{tmp}/tb.db", SQLiteStore, True),
    ],
)
def test_open_store_picks_the_backend_by_scheme(
    tmp_path: Path, url: str, kind: type, persistent: bool
) -> None:
    """Each URL form opens its backend; only a file outlives the process."""
    url = url.format(tmp=tmp_path)
    store = open_store(url, keys())
    try:
        assert isinstance(store, kind)
        assert is_persistent(url) is persistent
    finally:
        store.close()


@pytest.mark.parametrize(
    "url", ["mysql://db/x", "postgresql://", "memory:///x", "redis", "sqlite://x", ""]
)
def test_unknown_or_malformed_url_is_refused_naming_the_forms(url: str) -> None:
    """open_store refuses a URL no backend accepts with a StoreError listing the forms; config
    validation gives the same list at `store`; probe reports it."""
    with pytest.raises(
        StoreError,
        match=r"memory, memory://, postgres://HOST/DB, postgresql://HOST/DB, sqlite:///PATH",
    ):
        open_store(url, keys())
    with pytest.raises(ConfigError) as caught:
        parse_settings(f"store: '{url}'\n", {})
    (problem,) = caught.value.problems
    assert problem.path == "store" and "sqlite:///PATH" in problem.message
    (problem,) = probe(url, None)
    assert problem.path == "store"


def test_sqlite_url_without_a_path_is_refused() -> None:
    """`sqlite:///` alone names no file: StoreError listing the forms, nothing created."""
    with pytest.raises(StoreError, match="sqlite:///PATH"):
        open_store("sqlite:///", keys())


def test_bare_memory_config_is_the_pure_python_backend_without_a_key() -> None:
    """`store: memory` needs no encryption key and opens the in-process backend."""
    settings = parse_settings("store: memory\n", {})
    assert startup_problems(settings) == []
    store = open_configured(settings)
    try:
        assert isinstance(store, MemoryStore)
        assert probe(settings.store, None) == []
    finally:
        store.close()


def test_a_registered_backend_is_opened_for_its_scheme() -> None:
    """register_backend adds a scheme: open_store, schemes and config validation know it."""
    opened: list[str] = []

    def open_fake(url: str, keyring: Keyring, busy: float) -> MemoryStore:
        opened.append(url)
        return MemoryStore(keyring)

    register_backend(
        Backend(
            scheme="fake",
            form="fake://NAME",
            open=open_fake,
            valid=lambda url: len(url) > len("fake://"),
            persistent=lambda url: True,
            probe=lambda url, keyring: [],
        )
    )
    try:
        assert "fake://NAME" in schemes()
        assert isinstance(open_store("fake://x", keys()), MemoryStore)
        assert opened == ["fake://x"]
        settings = parse_settings("store: fake://x\n", {})
        assert [p.path for p in startup_problems(settings)] == ["encryption_keys"]
    finally:
        from tokenbroker.store import _BACKENDS  # noqa: PLC0415

        del _BACKENDS["fake"]
