"""The SQLite store's one connection: opening, durability, migrations, transactions, faults.

:class:`SQLiteConnection` opens a file in WAL mode with ``synchronous=FULL`` (``:memory:``
without WAL), brings its schema up to :data:`~.sqlite_schema.MIGRATIONS`, and serialises
every use behind one lock. Every :class:`sqlite3.Error` leaves it as a
:class:`~tokenbroker.errors.StoreError` made by :func:`translate`, the one place SQLite's
exceptions are translated. :class:`RawSQLite` is the SQLite side of the raw test hook
(:class:`~.base.RawState`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import StoreCorruptError, StoreError
from .sealing import KEY_COLUMNS
from .sqlite_schema import MIGRATIONS

__all__ = ["RawSQLite", "SQLiteConnection", "translate"]


def translate(exc: sqlite3.Error, path: str) -> StoreError:
    """A StoreError naming the store's file and why it failed (SQLite's messages carry table
    and column names, never bound values).

    Args:
        exc: What SQLite raised.
        path: The store's file, or ``:memory:``.

    Returns:
        :class:`~tokenbroker.errors.StoreCorruptError` for a damaged file, else a
        :class:`~tokenbroker.errors.StoreError` saying locked, full, read-only or failed.
    """
    text = str(exc).lower()
    where = "the in-memory store" if path == ":memory:" else f"the store {path}"
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        return StoreCorruptError(f"{where} is damaged ({exc})")
    if "locked" in text or "busy" in text:
        return StoreError(f"{where} stayed locked beyond its busy timeout")
    if "full" in text:
        return StoreError(f"{where}: the disk is full")
    if "readonly" in text or "read-only" in text:
        return StoreError(f"{where} is read-only ({exc})")
    return StoreError(f"{where} failed: {type(exc).__name__}: {exc}")


class SQLiteConnection:
    """One SQLite connection, opened, migrated and guarded by one lock.

    Args:
        path: A file path (created with mode 0600 if missing), or ``:memory:``.
        busy_timeout: Seconds to wait for another process's write lock.
        verify: Runs on the migrated connection before it is handed out (the store checks
            its keys there); whatever it raises closes the connection and propagates.

    Raises:
        StoreError: When the file cannot be opened or migrated.
    """

    def __init__(
        self, path: str, busy_timeout: float, verify: Callable[[sqlite3.Connection], None]
    ) -> None:
        self.path = path
        self.lock = threading.RLock()
        memory = path == ":memory:"
        try:
            if not memory and not Path(path).exists():
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            self.db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            if not memory:
                self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            self._migrate()
            verify(self.db)
        except BaseException as exc:
            # A store that refuses to open must not keep the file open until a GC cycle runs.
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self.db.close()
            if isinstance(exc, sqlite3.Error):
                raise translate(exc, path) from None
            if isinstance(exc, OSError):
                raise StoreError(f"cannot open the store {path}: {exc.strerror}") from None
            raise

    def __repr__(self) -> str:
        return f"SQLiteConnection(path={self.path!r})"

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self.db.close()

    def pragma(self, name: str, value: int | str | None = None) -> Any:
        """Read, or set, one PRAGMA (see :meth:`~.sqlite.SQLiteStore.pragma`).

        Raises:
            ValueError: The name or value is not a plain word or number.
        """
        if not name.replace("_", "").isalpha() or not str(value or 0).isalnum():
            raise ValueError("a PRAGMA name is letters and underscores, its value a word")
        with self.guard():
            if value is not None:
                self.db.execute(f"PRAGMA {name} = {value}")
            row = self.db.execute(f"PRAGMA {name}").fetchone()
        return None if row is None else row[0]

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Hold the lock; an :class:`sqlite3.Error` inside leaves as :func:`translate` says."""
        with self.lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise translate(exc, self.path) from None

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        """A write transaction: ``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error."""
        with self.guard():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS tb_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute(
                "SELECT value FROM tb_meta WHERE name = 'schema_version'"
            ).fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"the store has schema version {version}; "
                    f"this tokenbroker knows up to {len(MIGRATIONS)}"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    self.db.execute(statement)
                self.db.execute(
                    "INSERT INTO tb_meta (name, value) VALUES ('schema_version', ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (str(number),),
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise


class RawSQLite:
    """The SQLite side of the raw test hook (:class:`~.base.RawState`)."""

    def __init__(self, connection: SQLiteConnection) -> None:
        self._connection = connection

    def read(self, table: str, key: str | int, column: str) -> Any:
        with self._connection.guard():
            row = self._connection.db.execute(
                f"SELECT {_word(column)} FROM {_word(table)} WHERE {KEY_COLUMNS[table]} = ?",
                (key,),
            ).fetchone()
        if row is None:
            raise KeyError((table, key))
        return row[0]

    def write(self, table: str, key: str | int, column: str, value: Any) -> None:
        with self._connection.tx():
            self._connection.db.execute(
                f"UPDATE {_word(table)} SET {_word(column)} = ? WHERE {KEY_COLUMNS[table]} = ?",
                (value, key),
            )

    def persisted(self) -> bytes:
        path = self._connection.path
        if path == ":memory:":
            with self._connection.guard():
                return self._connection.db.serialize()
        files = [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")]
        return b"".join(f.read_bytes() for f in files if f.exists())


def _word(name: str) -> str:
    """A table or column name, checked to be one before it goes into SQL."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a column name: {name!r}")
    return name
