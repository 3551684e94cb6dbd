"""`tokenbroker migrate` and the schema line of `tokenbroker check`, on SQLite and on a real
PostgreSQL: check reads without creating, migrate says what it applied, then nothing to do."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from support import client_credentials
from tokenbroker.cli.main import main
from tokenbroker.core.crypto import generate_key
from tokenbroker.store.sqlite_schema import MIGRATIONS
from tokenbroker.testing import AuthorizationServer

KEY = generate_key()


def write_config(tmp_path: Path, store: str, auth_server: AuthorizationServer) -> Path:
    path = tmp_path / "tokenbroker.yaml"
    config = {
        "store": store,
        "encryption_keys": [KEY],
        "providers": {"svc": client_credentials(auth_server)},
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_sqlite_check_reads_only_and_migrate_reports_what_it_applied(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """check on a missing SQLite store says "not created yet" and creates no file; migrate
    applies versions 1..N and says so; again it has nothing to do; check then says current."""
    db = tmp_path / "tb.db"
    path = write_config(tmp_path, f"sqlite:///{db}", auth_server)
    code, out = run("check", "--config", str(path))
    assert code == 0, out
    assert "not created yet" in out
    assert not db.exists()
    code, out = run("migrate", "--config", str(path))
    assert code == 0, out
    known = len(MIGRATIONS)
    assert f"migrated from schema version 0 to {known}" in out
    assert f"(applied {', '.join(str(n) for n in range(1, known + 1))})" in out
    code, out = run("migrate", "--config", str(path))
    assert code == 0, out
    assert f"schema version {known} is current; nothing to do" in out
    code, out = run("check", "--config", str(path))
    assert code == 0, out
    assert f"schema version {known} is current" in out
    assert KEY not in out


def test_sqlite_store_behind_is_reported_and_one_ahead_refused(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """A store one version behind: check says migrate brings it up to date and migrate
    applies exactly the last one; a store from a newer tokenbroker makes migrate fail."""
    db = tmp_path / "tb.db"
    path = write_config(tmp_path, f"sqlite:///{db}", auth_server)
    assert run("migrate", "--config", str(path))[0] == 0
    known = len(MIGRATIONS)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE tb_meta SET value = ? WHERE name = 'schema_version'", (known + 1,))
    code, out = run("migrate", "--config", str(path))
    assert code != 0
    assert f"schema version {known + 1}" in out
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE tb_meta SET value = ? WHERE name = 'schema_version'", (known,))
    code, out = run("check", "--config", str(path))
    assert code == 0 and "is current" in out


def test_postgres_migrate_once_then_current(
    tmp_path: Path, pg_url: str, auth_server: AuthorizationServer
) -> None:
    """On a fresh PostgreSQL database: check says not created yet and creates no table,
    migrate applies every version, a second migrate has nothing to do, check says current;
    the URL's password is never printed."""
    pytest.importorskip("psycopg")
    from tokenbroker.store.postgres_schema import MIGRATIONS as PG_MIGRATIONS

    path = write_config(tmp_path, pg_url, auth_server)
    code, out = run("check", "--config", str(path))
    assert code == 0, out
    assert "not created yet" in out
    code, out = run("check", "--config", str(path))
    assert "not created yet" in out  # check really wrote nothing
    known = len(PG_MIGRATIONS)
    code, out = run("migrate", "--config", str(path))
    assert code == 0, out
    assert f"migrated from schema version 0 to {known}" in out
    code, out = run("migrate", "--config", str(path))
    assert code == 0 and "nothing to do" in out, out
    code, out = run("check", "--config", str(path))
    assert code == 0 and f"schema version {known} is current" in out, out
    password = pg_url.partition("://")[2].partition("@")[0].partition(":")[2]
    if password:
        assert password not in out
