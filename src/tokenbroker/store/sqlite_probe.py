"""The read-only check behind ``tokenbroker check``: would the SQLite store open?

:func:`probe` finds what would stop :class:`~.sqlite.SQLiteStore` from opening a
``sqlite:///`` URL without writing anything: no store, journal or shared-memory file is
created, nothing is migrated.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from ..core.crypto import Keyring
from ..errors import ConfigProblem, StoreCorruptError
from .sqlite_connection import translate
from .sqlite_schema import ALL_SECRETS, MIGRATIONS

__all__ = ["probe"]


def probe(url: str, keyring: Keyring | None) -> list[ConfigProblem]:
    """What would stop the store at ``url`` from opening, found without writing anything.

    The store's folder must take new files (the store itself, SQLite's journal). An existing
    store is opened read-only, without migrating: its schema must be one this version knows,
    and every stored secret must be under a key of ``keyring`` (skipped when None).

    Args:
        url: The ``store`` setting.
        keyring: The configured encryption keys, or None when there are none.

    Returns:
        The problems, at ``store`` or ``encryption_keys``; they name key ids, never keys.
    """
    if url.removeprefix("sqlite:///") == ":memory:":
        return []
    path = Path(url.removeprefix("sqlite:///"))
    problems = []
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        problems.append(
            ConfigProblem("store", f"cannot create files in {path.parent}: {exc.strerror}")
        )
    if path.is_file():
        try:
            problems += _probe_file(path, keyring)
        except sqlite3.Error as exc:
            problems.append(ConfigProblem("store", str(translate(exc, str(path)))))
    return problems


def _probe_file(path: Path, keyring: Keyring | None) -> list[ConfigProblem]:
    # With no -wal file beside it, no process has the store open: read it as immutable, so
    # not even SQLite's shared-memory file is created. Otherwise plain read-only.
    live = path.with_name(path.name + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro{'' if live else '&immutable=1'}"
    db = sqlite3.connect(uri, uri=True)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        version = 0
        if "tb_meta" in tables:
            row = db.execute("SELECT value FROM tb_meta WHERE name = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            message = (
                f"has schema version {version}; this tokenbroker knows up to {len(MIGRATIONS)}"
            )
            return [ConfigProblem("store", message)]
        if keyring is None or not {"tb_credential", "tb_attempt", "tb_signing_key"} <= tables:
            return []
        blobs = db.execute(ALL_SECRETS).fetchall()
    finally:
        db.close()
    unknown: dict[str, int] = {}
    for (blob,) in blobs:
        try:
            known = keyring.knows(blob)
        except StoreCorruptError as exc:
            return [ConfigProblem("store", str(exc))]
        if not known:
            key_id = Keyring.key_id(blob).hex()
            unknown[key_id] = unknown.get(key_id, 0) + 1
    return [
        ConfigProblem(
            "encryption_keys",
            f"{count} stored secret(s) are encrypted with key {key_id}, which is not among "
            "encryption_keys (add that key back; `tokenbroker rotate-key` then moves them)",
        )
        for key_id, count in sorted(unknown.items())
    ]
