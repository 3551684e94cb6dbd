"""The conformance suite's fixtures and helpers: how it opens a backend, and one refresh.

:class:`StoreFactory` says how to open one backend; :class:`ConformanceBase` gives every part
of the suite its ``key`` and ``store`` fixtures. Needs pytest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.secret import Secret
from tokenbroker.core.token import Token
from tokenbroker.store import Lease, Store, StoredToken

__all__ = [
    "ConformanceBase",
    "StoreFactory",
    "keyring",
    "refresh",
    "stored",
    "wait_until_expired",
]


@dataclass(frozen=True)
class StoreFactory:
    """How the suite opens one backend.

    Attributes:
        name: The backend's name in test ids.
        open: Opens the store with a keyring; each call opens the *same* store again (another
            connection, or another process's view) when ``reopenable``.
        reopenable: Whether a second ``open`` sees what the first wrote (False for a SQLite
            ``:memory:`` database, which lives and dies with its one connection).
    """

    name: str
    open: Callable[[Keyring], Store]
    reopenable: bool = True


def keyring(*keys: str) -> Keyring:
    """A keyring of the given keys (the first encrypts)."""
    return Keyring([Secret(k) for k in keys])


def stored(access_token: str = "AT-1", *, lifetime: float = 3600.0, fp: str = "fp") -> StoredToken:
    """A stored access token issued now."""
    obtained = time.time()
    return StoredToken(
        token=Token(access_token, "Bearer", obtained + lifetime, "read write"),
        lifetime=lifetime,
        obtained_at=obtained,
        fingerprint=fp,
    )


def refresh(store: Store, row: str, owner: str, rt: str, at: str, raw: bytes = b"") -> Lease:
    """One whole refresh under a fresh lease: acquire, intent, commit, release."""
    lease = store.acquire(row, "prov", owner, 30)
    assert lease is not None
    attempt = store.begin_attempt(lease)
    assert store.commit(lease, attempt, stored(at), refresh_token=Secret(rt), raw=raw)
    store.release(lease)
    return lease


def wait_until_expired(store: Store, lease: Lease) -> None:
    """Poll the store's clock until it passes the lease's expiry (5 s deadline)."""
    deadline = time.monotonic() + 5
    while store.now() <= lease.expires_at:
        assert time.monotonic() < deadline, "the lease never expired by the store's clock"
        time.sleep(0.005)


class ConformanceBase:
    """The fixtures every part of the suite shares; a test module provides ``store_factory``."""

    @pytest.fixture
    def key(self) -> str:
        """A fresh encryption key."""
        return generate_key()

    @pytest.fixture
    def store(self, store_factory: StoreFactory, key: str) -> Iterator[Store]:
        """The backend, opened with ``key``."""
        opened = store_factory.open(keyring(key))
        yield opened
        opened.close()

    @staticmethod
    def _reopenable(factory: StoreFactory) -> None:
        if not factory.reopenable:
            pytest.skip(f"{factory.name} cannot be opened twice")
