"""The PostgreSQL store's connections: the URL, the pool, transactions, migrations, faults.

``postgresql://user[:password]@host[:port]/db?min_size=1&max_size=8&timeout=5&…``: the pool
settings are ours (:class:`PoolSettings`); every other query parameter is libpq's and goes
to the server as given. What libpq would otherwise leave unbounded gets a default here
(:data:`DSN_DEFAULTS`): a blackholed server is given up on after ``connect_timeout`` /
``tcp_user_timeout`` instead of psycopg's long cancel tail, and a server that stops
answering a held lock cannot keep a statement waiting for ever.

:class:`PostgresConnection` is a sync ``psycopg_pool.ConnectionPool`` (the engine calls the
store from threads) that checks each connection before handing it out (a connection the
server dropped — a restart — is replaced, not used), is opened with ``wait=False`` (it
starts even while the server is down, and fills once it is back), and is always asked with
an explicit timeout. Every psycopg fault leaves as a :class:`~tokenbroker.errors.StoreError`
made by :func:`translate`, the one place they are translated; a URL's password appears in
no message and no repr. :class:`RawPostgres` is the PostgreSQL side of the raw test hook.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool

from ..errors import StoreCorruptError, StoreError
from .postgres_schema import MIGRATION_LOCK, MIGRATIONS, NOW
from .sealing import KEY_COLUMNS

__all__ = [
    "DSN_DEFAULTS",
    "PoolSettings",
    "PostgresConnection",
    "RawPostgres",
    "parse_url",
    "translate",
]

logger = logging.getLogger("tokenbroker.store.postgres")

#: libpq parameters a URL may leave out, and what we use then (why: the module docstring).
DSN_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "tokenbroker",
    "options": "-c statement_timeout=30s -c lock_timeout=10s"
    " -c idle_in_transaction_session_timeout=60s",
}


@dataclass(frozen=True)
class PoolSettings:
    """How many connections a store keeps and how long a caller waits for one.

    Attributes:
        min_size: Connections kept open (1: an idle replica holds one).
        max_size: At most this many (the engine's threads share them).
        timeout: Seconds a call waits for a connection before StoreError.
    """

    min_size: int = 1
    max_size: int = 8
    timeout: float = 5.0


def parse_url(url: str, timeout: float = 5.0) -> tuple[str, PoolSettings, str]:
    """Split a ``postgresql://`` URL into libpq's conninfo, our pool settings and a display form.

    Args:
        url: The ``store`` setting.
        timeout: The pool timeout when the URL names none.

    Returns:
        ``(conninfo, settings, display)``; ``display`` is the URL without password or query.

    Raises:
        ValueError: A pool setting is not a number in range, or libpq rejects the rest
            (the message never contains the password).
    """
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    try:
        settings = PoolSettings(
            min_size=int(query.pop("min_size", PoolSettings.min_size)),
            max_size=int(query.pop("max_size", PoolSettings.max_size)),
            timeout=float(query.pop("timeout", timeout)),
        )
    except ValueError:
        raise ValueError("min_size and max_size must be integers, timeout a number") from None
    if not 0 <= settings.min_size <= settings.max_size or settings.max_size < 1:
        raise ValueError("needs 0 <= min_size <= max_size and max_size >= 1")
    if not settings.timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    query = {**DSN_DEFAULTS, **query}
    conninfo = urlunsplit(
        parts._replace(scheme="postgresql", query=urlencode(query, quote_via=quote))
    )
    host = parts.hostname or "localhost"
    where = f"{parts.username}@{host}" if parts.username else host
    display = f"postgresql://{where}{f':{parts.port}' if parts.port else ''}{parts.path}"
    try:
        psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise ValueError(_scrub(str(exc).splitlines()[0], parts.password)) from None
    return conninfo, settings, display


def translate(exc: psycopg.Error, where: str, password: str | None = None) -> StoreError:
    """A StoreError naming the store and why it failed.

    Only the server's primary message (or the first line of a client-side one) is kept: a
    ``DETAIL`` may quote row values. A password is never in the result.

    Args:
        exc: What psycopg (or its pool) raised.
        where: The store's display URL.
        password: The URL's password, scrubbed from the message if present.

    Returns:
        :class:`~tokenbroker.errors.StoreCorruptError` for damaged data, else a StoreError.
    """
    diag = getattr(exc, "diag", None)
    primary = (diag.message_primary if diag is not None else None) or str(exc)
    text = _scrub(primary.splitlines()[0] if primary else type(exc).__name__, password)
    if isinstance(exc, psycopg.errors.DataCorrupted):
        return StoreCorruptError(f"the store {where} is damaged ({text})")
    if isinstance(exc, psycopg.OperationalError):
        return StoreError(f"the store {where} is unavailable: {text}")
    return StoreError(f"the store {where} failed: {type(exc).__name__}: {text}")


def _scrub(text: str, password: str | None) -> str:
    return text.replace(password, "***") if password else text


class PostgresConnection:
    """A pool of connections to one database, its schema brought up to date on opening.

    Args:
        url: The ``postgresql://`` URL.
        timeout: Seconds to wait for a connection when the URL names no ``timeout``.
        verify: Runs in the migration's transaction, before the pool is handed out (the store
            checks its keys there); whatever it raises closes the pool and propagates.

    Raises:
        StoreError: The URL is malformed, or the database cannot be reached or migrated.
    """

    def __init__(
        self, url: str, timeout: float, verify: Callable[[psycopg.Cursor[Any]], None]
    ) -> None:
        try:
            conninfo, self.settings, self.where = parse_url(url, timeout)
        except ValueError as exc:
            raise StoreError(f"store URL: {exc}") from None
        self._password = urlsplit(url).password
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            min_size=self.settings.min_size,
            max_size=self.settings.max_size,
            timeout=self.settings.timeout,
            check=ConnectionPool.check_connection,
            name="tokenbroker",
            open=False,
        )
        # wait=False: with the server down, wait=True would leave the pool closed for good.
        self.pool.open(wait=False)
        try:
            with self.tx() as cursor:
                self._migrate(cursor)
                verify(cursor)
        except BaseException:
            self.pool.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresConnection(url={self.where!r})"

    def close(self) -> None:
        """Close every connection of the pool."""
        self.pool.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction on a pooled connection: committed at the end, rolled back on any
        error; a psycopg fault leaves as :func:`translate` says.

        Raises:
            StoreError: No connection within the pool timeout, or the statement failed.
        """
        try:
            with (
                self.pool.connection(timeout=self.settings.timeout) as conn,
                conn.transaction(),
                conn.cursor() as cursor,
            ):
                yield cursor
        except psycopg.Error as exc:
            raise translate(exc, self.where, self._password) from None

    def _migrate(self, cursor: psycopg.Cursor[Any]) -> None:
        """Bring the schema up to date, once, whoever else is starting (the advisory lock is
        held until the caller's transaction ends)."""
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS tb_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        cursor.execute("SELECT value FROM tb_meta WHERE name = 'schema_version'")
        row = cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the store {self.where} has schema version {version}; "
                f"this tokenbroker knows up to {len(MIGRATIONS)}"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            logger.info("migrating the store %s to schema version %d", self.where, number)
            cursor.execute(script.encode())
            cursor.execute(
                "INSERT INTO tb_migration (version, applied_at, backend_pid)"
                f" VALUES (%s, {NOW}, pg_backend_pid())",
                (number,),
            )
            cursor.execute(
                "INSERT INTO tb_meta (name, value) VALUES ('schema_version', %s)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (str(number),),
            )


class RawPostgres:
    """The PostgreSQL side of the raw test hook (:class:`~.base.RawState`)."""

    def __init__(self, connection: PostgresConnection) -> None:
        self._connection = connection

    def read(self, table: str, key: str | int, column: str) -> Any:
        with self._connection.tx() as cursor:
            cursor.execute(
                f"SELECT {_word(column)} FROM {_word(table)} WHERE {KEY_COLUMNS[table]} = %s",
                (key,),
            )
            row = cursor.fetchone()
        if row is None:
            raise KeyError((table, key))
        return row[0]

    def write(self, table: str, key: str | int, column: str, value: Any) -> None:
        with self._connection.tx() as cursor:
            cursor.execute(
                f"UPDATE {_word(table)} SET {_word(column)} = %s WHERE {KEY_COLUMNS[table]} = %s",
                (value, key),
            )

    def persisted(self) -> bytes:
        """Every value of every table, ciphertexts as their stored bytes (not hex-encoded, so a
        plaintext secret would show as itself)."""
        out: list[bytes] = []
        with self._connection.tx() as cursor:
            for table in sorted({*KEY_COLUMNS, "tb_migration"}):
                cursor.execute(f"SELECT * FROM {_word(table)}")
                for row in cursor.fetchall():
                    out.append(b"\t".join(_as_bytes(value) for value in row))
        return b"\n".join(out)


def _as_bytes(value: Any) -> bytes:
    return bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()


def _word(name: str) -> str:
    """A table or column name, checked to be one before it goes into SQL."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a column name: {name!r}")
    return name
