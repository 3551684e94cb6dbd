"""The durable store: one protocol (:mod:`.base`), backends chosen by URL scheme.

``open_store(url, keyring)`` looks the URL's scheme up in a registry (model: the
``limits`` library's storage registry) and opens that backend:

==========================  ==============================================================
``sqlite:///PATH``          a SQLite file, WAL, ``synchronous=FULL`` (the default)
``sqlite:///:memory:``      the same SQLite schema in process memory
``memory://``, ``memory``   the pure-Python in-process backend (nothing survives the process)
``postgresql://…``          a PostgreSQL database shared by replicas (extra ``postgres``)
==========================  ==============================================================

A new backend registers itself with :func:`register_backend` and must
pass :mod:`tokenbroker.testing.store_conformance` unchanged. Engine code names only the
protocols (:class:`Store` and its parts) and :func:`open_store`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core.crypto import Keyring
from ..errors import ConfigProblem, StoreError
from .base import ConsumerStore, CredentialStore, JobStore, RawState, SigningKeyStore, Store
from .memory import MemoryStore
from .postgres_probe import MISSING_EXTRA as _PG_MISSING
from .postgres_probe import probe as _probe_postgres
from .rows import (
    Attempt,
    CredentialRow,
    JobEventRow,
    JobLease,
    JobPage,
    JobRow,
    Lease,
    NewJobEvent,
    StoredToken,
)
from .sqlite import SQLiteStore
from .sqlite_probe import probe as _probe_sqlite

__all__ = [
    "Attempt",
    "Backend",
    "ConsumerStore",
    "CredentialRow",
    "CredentialStore",
    "JobEventRow",
    "JobLease",
    "JobPage",
    "JobRow",
    "JobStore",
    "Lease",
    "NewJobEvent",
    "RawState",
    "SigningKeyStore",
    "Store",
    "StoredToken",
    "backend_for",
    "is_persistent",
    "open_store",
    "probe",
    "register_backend",
    "schemes",
]


@dataclass(frozen=True)
class Backend:
    """One registered store backend.

    Attributes:
        scheme: The URL scheme it serves (``sqlite``).
        form: The URL form shown in errors (``sqlite:///PATH``).
        open: Opens ``(url, keyring, busy_timeout)``; raises StoreError or EncryptionKeyError.
        valid: Whether a URL of this scheme is well formed.
        persistent: Whether a URL keeps its state beyond the process (then a configured
            encryption key is required).
        probe: What would stop ``(url, keyring or None)`` from opening, found read-only.
    """

    scheme: str
    form: str
    open: Callable[[str, Keyring, float], Store]
    valid: Callable[[str], bool]
    persistent: Callable[[str], bool]
    probe: Callable[[str, Keyring | None], list[ConfigProblem]]


_BACKENDS: dict[str, Backend] = {}

#: Bare values accepted for compatibility, and the URL each one means.
_ALIASES = {"memory": "memory://"}


def register_backend(backend: Backend) -> None:
    """Make ``open_store`` open URLs of ``backend.scheme`` with it (replacing any earlier one).

    Args:
        backend: The backend.
    """
    _BACKENDS[backend.scheme] = backend


def schemes() -> list[str]:
    """The URL forms every registered backend accepts, and the bare aliases, sorted.

    Returns:
        E.g. ``["memory", "memory://", "sqlite:///PATH"]``.
    """
    return sorted([*_ALIASES, *(b.form for b in _BACKENDS.values())])


def backend_for(url: str) -> tuple[Backend, str]:
    """The backend serving ``url``, and the URL with any alias resolved.

    Args:
        url: The ``store`` setting.

    Returns:
        ``(backend, url)``.

    Raises:
        ValueError: No registered backend accepts the URL; the message lists the forms.
    """
    url = _ALIASES.get(url, url)
    scheme, sep, _ = url.partition("://")
    backend = _BACKENDS.get(scheme) if sep else None
    if backend is None or not backend.valid(url):
        raise ValueError(f"must be one of {', '.join(schemes())}")
    return backend, url


def open_store(url: str, keyring: Keyring, *, busy_timeout: float = 5.0) -> Store:
    """Open (and migrate) the store at ``url``.

    Args:
        url: ``sqlite:///PATH``, ``sqlite:///:memory:``, ``memory://`` or ``memory``.
        keyring: Seals and opens every secret.
        busy_timeout: Seconds to wait for another process's write lock (where that exists).

    Returns:
        The store.

    Raises:
        StoreError: Unknown URL, or the store cannot be opened or migrated.
        EncryptionKeyError: Stored secrets need a key the keyring lacks.
    """
    try:
        backend, url = backend_for(url)
    except ValueError as exc:
        raise StoreError(f"store {exc}") from None
    return backend.open(url, keyring, busy_timeout)


def is_persistent(url: str) -> bool:
    """Whether the store at ``url`` outlives the process (so it needs a configured key).

    Raises:
        ValueError: No registered backend accepts the URL.
    """
    backend, url = backend_for(url)
    return backend.persistent(url)


def probe(url: str, keyring: Keyring | None) -> list[ConfigProblem]:
    """What would stop the store at ``url`` from opening, found without writing anything.

    Args:
        url: The ``store`` setting.
        keyring: The configured encryption keys, or None when there are none.

    Returns:
        The problems, at ``store`` or ``encryption_keys``; they name key ids, never keys.
    """
    try:
        backend, url = backend_for(url)
    except ValueError as exc:
        return [ConfigProblem("store", str(exc))]
    return backend.probe(url, keyring)


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


register_backend(
    Backend(
        scheme="sqlite",
        form="sqlite:///PATH",
        open=lambda url, keyring, busy: SQLiteStore.from_url(url, keyring, busy_timeout=busy),
        valid=lambda url: url.startswith("sqlite:///") and bool(_sqlite_path(url)),
        persistent=lambda url: _sqlite_path(url) != ":memory:",
        probe=_probe_sqlite,
    )
)
register_backend(
    Backend(
        scheme="memory",
        form="memory://",
        open=lambda url, keyring, busy: MemoryStore.from_url(url, keyring),
        valid=lambda url: url == "memory://",
        persistent=lambda url: False,
        probe=lambda url, keyring: [],
    )
)


def _open_postgres(url: str, keyring: Keyring, busy_timeout: float) -> Store:
    """Open a ``postgresql://`` store; psycopg is imported only now (an optional extra)."""
    try:
        from .postgres import PostgresStore  # noqa: PLC0415 - needs the 'postgres' extra
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] in ("psycopg", "psycopg_pool"):
            raise StoreError(_PG_MISSING) from None
        raise
    return PostgresStore.from_url(url, keyring, busy_timeout=busy_timeout)


def _postgres_valid(url: str) -> bool:
    rest = url.partition("://")[2]
    return bool(rest) and not rest.startswith("?")


for _scheme in ("postgresql", "postgres"):
    register_backend(
        Backend(
            scheme=_scheme,
            form=f"{_scheme}://HOST/DB",
            open=_open_postgres,
            valid=_postgres_valid,
            persistent=lambda url: True,
            probe=_probe_postgres,
        )
    )
