"""``tokenbroker migrate`` and the schema line of ``check``: the store's schema version.

``serve`` (and every command that opens the store) migrates on opening; ``migrate`` does the
same explicitly, for operators who bring the schema up to date before rolling out new
replicas, and prints what it did. :func:`schema_state` reads the version without writing
anything (``check`` is read-only). PostgreSQL migrations hold an advisory lock, so replicas
starting together, or ``migrate`` racing a starting replica, migrate once.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import click

from ..config import load_settings
from ..errors import ConfigError, StoreError, TokenBrokerError
from .command import config_option, fail, open_store

__all__ = ["SchemaState", "migrate", "schema_line", "schema_state"]


@dataclass(frozen=True)
class SchemaState:
    """A store's schema version against the one this tokenbroker knows.

    Attributes:
        where: The store, without any password (a path, or ``host:port/db``).
        version: The stored version; 0 when nothing exists yet.
        known: The newest version this tokenbroker knows; None: the store keeps nothing.
    """

    where: str
    version: int
    known: int | None

    @property
    def current(self) -> bool:
        """Whether nothing is left to migrate."""
        return self.known is None or self.version == self.known


def schema_state(url: str) -> SchemaState:
    """Read the schema version of the store at ``url`` without creating or changing anything.

    Args:
        url: The ``store`` setting.

    Returns:
        The state; version 0 for a store that does not exist yet.

    Raises:
        StoreError: The store cannot be read (the message never holds a password).
    """
    scheme = url.partition("://")[0]
    if scheme in ("postgresql", "postgres"):
        return _postgres_state(url)
    if scheme == "sqlite":
        path = url.removeprefix("sqlite:///")
        if path != ":memory:":
            return _sqlite_state(Path(path))
    return SchemaState(where=url, version=0, known=None)


def schema_line(state: SchemaState) -> str:
    """What ``check`` prints about the schema (one line)."""
    if state.known is None:
        return f"store {state.where}: keeps nothing between runs; no schema to migrate"
    if state.version == 0:
        return (
            f"store {state.where}: not created yet; `tokenbroker migrate` (or serve) "
            f"creates schema version {state.known}"
        )
    if state.current:
        return f"store {state.where}: schema version {state.version} is current"
    return (
        f"store {state.where}: schema version {state.version}, this tokenbroker knows "
        f"{state.known}; `tokenbroker migrate` (or serve) brings it up to date"
    )


@click.command("migrate")
@config_option
def migrate(config_path: Path) -> None:
    """Bring the store's schema up to date and print what was done (safe to run while
    replicas are running; a PostgreSQL store migrates once under an advisory lock)."""
    try:
        settings = load_settings(config_path)
        before = schema_state(settings.store)
        if before.known is not None and before.version > before.known:
            raise StoreError(
                f"the store {before.where} has schema version {before.version}; "
                f"this tokenbroker knows up to {before.known}"
            )
        open_store(config_path, settings).close()
        after = schema_state(settings.store)
    except (ConfigError, TokenBrokerError) as exc:
        fail(exc)
    if after.known is None:
        click.echo(f"store {after.where}: keeps nothing between runs; nothing to migrate")
    elif after.version == before.version:
        click.echo(f"store {after.where}: schema version {after.version} is current; nothing to do")
    else:
        steps = ", ".join(str(n) for n in range(before.version + 1, after.version + 1))
        click.echo(
            f"store {after.where}: migrated from schema version {before.version} "
            f"to {after.version} (applied {steps})"
        )


def _sqlite_state(path: Path) -> SchemaState:
    from ..store.sqlite_schema import MIGRATIONS  # noqa: PLC0415

    known = len(MIGRATIONS)
    if not path.is_file():
        return SchemaState(where=str(path), version=0, known=known)
    # Read-only, and without SQLite's shared-memory file when no process has it open.
    live = path.with_name(path.name + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro{'' if live else '&immutable=1'}"
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            row = (
                db.execute("SELECT value FROM tb_meta WHERE name = 'schema_version'").fetchone()
                if "tb_meta" in tables
                else None
            )
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the store {path}: {exc}") from None
    return SchemaState(where=str(path), version=int(row[0]) if row else 0, known=known)


def _postgres_state(url: str) -> SchemaState:
    try:
        import psycopg  # noqa: PLC0415

        from ..store.postgres_connection import parse_url, translate  # noqa: PLC0415
        from ..store.postgres_schema import MIGRATIONS  # noqa: PLC0415
    except ModuleNotFoundError:
        from ..store.postgres_probe import MISSING_EXTRA  # noqa: PLC0415

        raise StoreError(MISSING_EXTRA) from None
    try:
        conninfo, _, where = parse_url(url)
    except ValueError as exc:
        raise StoreError(f"store URL: {exc}") from None
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.read_only = True
            row = None
            if conn.execute("SELECT to_regclass('tb_meta')").fetchone() not in (None, (None,)):
                row = conn.execute(
                    "SELECT value FROM tb_meta WHERE name = 'schema_version'"
                ).fetchone()
    except psycopg.Error as exc:
        raise translate(exc, where, urlsplit(url).password) from None
    return SchemaState(where=where, version=int(row[0]) if row else 0, known=len(MIGRATIONS))
