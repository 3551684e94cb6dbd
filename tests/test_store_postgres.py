"""PostgreSQL-only store tests: migrations under concurrent openers (and the jobs migration
on a database an older tokenbroker made), a server outage and recovery, what a backup and
the data directory hold, the URL and its pool settings, the missing extra, processes racing
a refresh on one database, and jobs raced across connections. The backend-generic
guarantees are in tokenbroker.testing.store_conformance (run by test_store_conformance.py).

Every test runs against the session's own PostgreSQL server (tests/pg.py), never 5432."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import wait_for
from test_processes import run_workers
from tokenbroker import Secret, StoreError
from tokenbroker.core.crypto import generate_key
from tokenbroker.store import open_store
from tokenbroker.store.postgres import PostgresStore
from tokenbroker.store.postgres_connection import DSN_DEFAULTS, PoolSettings, parse_url
from tokenbroker.store.postgres_schema import MIGRATION_LOCK, MIGRATIONS
from tokenbroker.testing import AuthorizationServer
from tokenbroker.testing.store_conformance import keyring, refresh, stored

ROOT = Path(__file__).resolve().parent.parent


def _rows(server: Any, url: str, sql: str) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = server.execute(sql, url.rsplit("/", 1)[1].partition("?")[0])
    return rows


# -- migrations -------------------------------------------------------------------------------


def test_concurrent_openers_migrate_once(postgres_server: Any, pg_url: str) -> None:
    """Six stores opened at once on an empty database all open; the schema is applied once."""
    key = generate_key()
    barrier = threading.Barrier(6)
    results: list[object] = [None] * 6

    def opener(i: int) -> None:
        barrier.wait()
        try:
            results[i] = open_store(pg_url, keyring(key))
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=opener, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert all(isinstance(r, PostgresStore) for r in results), results
        applied = _rows(postgres_server, pg_url, "SELECT version, backend_pid FROM tb_migration")
        assert [version for version, _ in applied] == list(range(1, len(MIGRATIONS) + 1))
        assert len({pid for _, pid in applied}) == 1  # one opener did all the work
        version = _rows(
            postgres_server, pg_url, "SELECT value FROM tb_meta WHERE name = 'schema_version'"
        )
        assert version == [(str(len(MIGRATIONS)),)]
    finally:
        for r in results:
            if isinstance(r, PostgresStore):
                r.close()


def test_migration_waits_for_the_advisory_lock(postgres_server: Any, pg_url: str) -> None:
    """While another session holds the migration lock, an opener waits on it (seen in pg_locks)
    and creates nothing; once released it migrates."""
    import psycopg

    holder = psycopg.connect(pg_url, autocommit=True)
    opened: list[object] = []
    try:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        key = keyring(generate_key())
        thread = threading.Thread(target=lambda: opened.append(open_store(pg_url, key)))
        thread.start()
        wait_for(
            lambda: bool(
                _rows(
                    postgres_server,
                    pg_url,
                    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                )
            ),
            "the opener to wait on the advisory lock",
        )
        tables = "SELECT to_regclass('tb_credential')::text, to_regclass('tb_meta')::text"
        assert _rows(postgres_server, pg_url, tables) == [(None, None)]
        assert opened == []
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        thread.join(30)
        assert len(opened) == 1 and isinstance(opened[0], PostgresStore)
        assert _rows(postgres_server, pg_url, tables) == [("tb_credential", "tb_meta")]
    finally:
        holder.close()
        for store in opened:
            store.close()  # type: ignore[attr-defined]


# -- outages ----------------------------------------------------------------------------------


def test_server_restart_is_store_error_then_the_same_store_recovers(
    postgres_server: Any, pg_url: str
) -> None:
    """With the server stopped every call is a StoreError (within the pool timeout, naming no
    secret); after it starts again the same store object works, every row intact."""
    store = open_store(f"{pg_url}?timeout=1&min_size=2", keyring(generate_key()))
    try:
        refresh(store, "c", "A", "RT-CANARY-1", "AT-CANARY-1")
        store.add_consumer("etl", "a" * 64, ["svc"])
        postgres_server.stop()
        try:
            for call in (
                lambda: store.load("c"),
                lambda: store.acquire("c", "prov", "B", 30),
                store.consumers,
            ):
                with pytest.raises(StoreError, match="unavailable") as excinfo:
                    call()
                assert "CANARY" not in str(excinfo.value)
                assert excinfo.value.code == "store_unavailable"
        finally:
            postgres_server.start()
        # Every pooled connection died with the server: each is checked and replaced.
        took = wait_for(lambda: _answers(store), "the store to answer again", timeout=20)
        row = store.load("c")
        assert row is not None and row.refresh_token == Secret("RT-CANARY-1")
        assert row.token is not None and row.token.token.access_token == "AT-CANARY-1"
        assert [c[0] for c in store.consumers()] == ["etl"]
        for _ in range(4):  # every connection of the pool is a live one now
            lease = store.acquire("c", "prov", "B", 30)
            assert lease is not None
            store.release(lease)
        assert took < 10
    finally:
        store.close()


def _answers(store: Any) -> bool:
    try:
        store.now()
    except StoreError:
        return False
    return True


def test_killed_backend_connection_is_replaced(postgres_server: Any, pg_url: str) -> None:
    """A pooled connection the server terminated (pg_terminate_backend) is detected by the pool's
    check and replaced: the next calls succeed, none fails."""
    store = open_store(f"{pg_url}?min_size=1&max_size=1", keyring(generate_key()))
    try:
        refresh(store, "c", "A", "RT-1", "AT-1")
        killed = _rows(
            postgres_server,
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'tokenbroker' AND datname = current_database()",
        )
        assert killed == [(True,)]
        row = store.load("c")
        assert row is not None and row.refresh_token == Secret("RT-1")
    finally:
        store.close()


# -- encryption at rest (checklist D6) --------------------------------------------------------


def test_backup_and_data_files_hold_no_plaintext_canary(postgres_server: Any, pg_url: str) -> None:
    """pg_dump of the database, the server's data files and WAL after a checkpoint hold no
    canary (neither as text nor hex-encoded), while the non-secret marker is there."""
    store = open_store(pg_url, keyring(generate_key()))
    canaries = [f"CANARY_{kind}_{uuid.uuid4().hex}" for kind in ("AT", "RT", "SEED", "RAW", "PEM")]
    at, rt, seed, raw, pem = canaries
    try:
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        lease = store.reseed(lease, Secret(seed), "digest-marker")
        assert lease is not None
        attempt = store.begin_attempt(lease)
        body = f'{{"access_token":"{at}","refresh_token":"{rt}","x":"{raw}"}}'.encode()
        assert store.commit(lease, attempt, stored(at), refresh_token=Secret(rt), raw=body)
        store.add_signing_key("kid", "EdDSA", f"PEM {pem}".encode())
    finally:
        store.close()
    dump = postgres_server.dump(pg_url)
    assert b"digest-marker" in dump
    postgres_server.execute("CHECKPOINT")
    files = b"".join(
        p.read_bytes()
        for folder in (postgres_server.data / "base", postgres_server.data / "pg_wal")
        for p in folder.rglob("*")
        if p.is_file()
    )
    assert b"digest-marker" in files
    for canary in canaries:
        for form in (canary.encode(), canary.encode().hex().encode()):
            assert form not in dump, canary
            assert form not in files, canary
    assert all(c.encode() not in postgres_server.log.read_bytes() for c in canaries)


# -- the URL ----------------------------------------------------------------------------------


def test_url_pool_settings_and_libpq_defaults() -> None:
    """min_size/max_size/timeout come from the URL query (defaults otherwise) and never reach
    libpq; the connection time-outs and keepalives are added unless the URL sets them."""
    conninfo, settings, display = parse_url(
        "postgresql://tb:s3cret-pw@db.example:6543/tokens?max_size=20&timeout=2.5&connect_timeout=9"
    )
    assert settings == PoolSettings(min_size=1, max_size=20, timeout=2.5)
    assert display == "postgresql://tb@db.example:6543/tokens"
    import psycopg

    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    assert params["connect_timeout"] == "9"
    for name in ("keepalives", "keepalives_idle", "tcp_user_timeout", "options"):
        assert params[name] == DSN_DEFAULTS[name]
    assert "max_size" not in params and "timeout" not in params
    assert parse_url("postgresql://h/db", timeout=7)[1] == PoolSettings(timeout=7)


@pytest.mark.parametrize(
    "query", ["min_size=x", "min_size=5&max_size=2", "max_size=0", "timeout=0", "bogus_opt=1"]
)
def test_bad_url_is_store_error_without_the_password(query: str) -> None:
    """A malformed pool setting or an unknown libpq parameter is a StoreError at open; the
    message never holds the URL's password."""
    with pytest.raises(StoreError) as excinfo:
        open_store(f"postgresql://u:PW-CANARY@127.0.0.1:1/db?{query}", keyring(generate_key()))
    assert "PW-CANARY" not in str(excinfo.value)


def test_unreachable_server_is_store_error_naming_no_password(postgres_server: Any) -> None:
    """A server that refuses connections is a StoreError within the pool timeout; neither the
    message nor a repr holds the password."""
    port = postgres_server.port + 1 if postgres_server.port < 65535 else 1
    url = f"postgresql://postgres:PW-CANARY@127.0.0.1:{port}/db?timeout=1"
    with pytest.raises(StoreError, match="unavailable") as excinfo:
        open_store(url, keyring(generate_key()))
    assert "PW-CANARY" not in str(excinfo.value)
    assert f"127.0.0.1:{port}/db" in str(excinfo.value)
    store = open_store(
        postgres_server.url().replace("postgres@", "postgres:PW-CANARY@"), keyring(generate_key())
    )
    try:
        assert "PW-CANARY" not in repr(store)
    finally:
        store.close()


def test_missing_extra_names_the_pip_line() -> None:
    """Without psycopg installed, open_store raises StoreError and probe reports a problem, both
    naming pip install 'tokenbroker[postgres]'; the URL is still a valid setting."""
    script = """
import sys
sys.modules["psycopg"] = None
sys.modules["psycopg_pool"] = None
from tokenbroker.core.crypto import generate_key
from tokenbroker.testing.store_conformance import keyring
from tokenbroker.store import backend_for, open_store, probe
from tokenbroker.errors import StoreError
backend_for("postgresql://h/db")
try:
    open_store("postgresql://h/db", keyring(generate_key()))
except StoreError as exc:
    print("open:", exc)
print("probe:", probe("postgresql://h/db", None)[0])
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert all("pip install 'tokenbroker[postgres]'" in line for line in lines), lines


# -- processes racing a refresh ---------------------------------------------------------------


def test_two_processes_race_one_refresh_through_broker(pg_url: str, tmp_path: Path) -> None:
    """Two cold Broker processes (25 threads each) on one PostgreSQL database make exactly one
    refresh-token request, and both serve its access token."""
    server = AuthorizationServer(expires_in=3600, rotation="strict")
    server.add_client("rt-client", None, auth_method="none")
    with server:
        seed = server.issue_refresh_token("rt-client")
        settings = yaml.safe_dump(
            {
                "store": pg_url,
                "encryption_keys": [generate_key()],
                "defaults": {
                    "retries": 2,
                    "backoff_seconds": 0.01,
                    "deadline_seconds": 3,
                    "lease_seconds": 8,
                },
                "providers": {
                    "rt": {
                        "grant": "refresh_token",
                        "token_url": server.token_url,
                        "client_id": "rt-client",
                        "refresh_token": seed,
                        "rotation": {"single_use": True, "reuse_grace_seconds": 0},
                    }
                },
            }
        )
        reports, _ = run_workers(tmp_path, settings, count=2, threads=25, duration=0)
        assert server.count("refresh_token") == 1
        assert server.reused_refresh_tokens() == set()
        assert server.presented_refresh_tokens == [seed]
    assert [r["errors"] for r in reports] == [{}, {}]
    assert [r["calls"] for r in reports] == [25, 25]
    seen = [set(r["tokens"]) for r in reports]
    assert seen[0] == seen[1] and len(seen[0]) == 1


# -- jobs -------------------------------------------------------------------------------------


def test_jobs_migration_upgrades_a_schema_1_database(postgres_server: Any, pg_url: str) -> None:
    """A database at schema 1 (before jobs) opens at the latest version with its credential
    intact, and then queues, claims and saves jobs."""
    key = generate_key()
    store = open_store(pg_url, keyring(key))
    refresh(store, "c1", "A", "RT-1", "AT-1")
    store.close()
    _rows(
        postgres_server,
        pg_url,
        "DROP TABLE tb_job_event, tb_job_schedule, tb_job; DELETE FROM tb_migration"
        " WHERE version > 1; UPDATE tb_meta SET value = '1' WHERE name = 'schema_version'",
    )
    assert _rows(postgres_server, pg_url, "SELECT to_regclass('tb_job')::text") == [(None,)]
    store = open_store(pg_url, keyring(key))
    try:
        applied = _rows(postgres_server, pg_url, "SELECT version FROM tb_migration ORDER BY 1")
        assert applied == [(n,) for n in range(1, len(MIGRATIONS) + 1)]
        row = store.load("c1")
        assert row is not None and row.refresh_token == Secret("RT-1")
        added, cached = store.add_job("j", "warm", "k", "ops", "{}", time.time())
        lease = store.claim_job("j", "A", 30)
        assert not cached and lease is not None
        done = store.save_job(lease, "done", "{}", [("completed", "{}")])
        assert done is not None and (done.status, done.last_event) == ("done", 1)
    finally:
        store.close()


def test_racing_adds_of_one_idempotency_key_add_one_job(postgres_server: Any, pg_url: str) -> None:
    """Eight stores (own pools) add eight job ids with one idempotency key at once: exactly
    one is added, the other seven get that job back, and the table holds one row."""
    key = generate_key()
    stores = [open_store(pg_url, keyring(key)) for _ in range(8)]
    barrier = threading.Barrier(8)
    results: list[tuple[str, bool] | BaseException | None] = [None] * 8

    def add(n: int) -> None:
        barrier.wait()
        try:
            row, cached = stores[n].add_job(f"j{n}", "warm", "same", "ops", "{}", time.time())
            results[n] = (row.id, cached)
        except BaseException as exc:
            results[n] = exc

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(isinstance(r, tuple) for r in results), results
        outcomes = [r for r in results if isinstance(r, tuple)]
        winners = [job_id for job_id, cached in outcomes if not cached]
        assert len(winners) == 1
        assert {job_id for job_id, _ in outcomes} == set(winners)
        assert _rows(postgres_server, pg_url, "SELECT count(*) FROM tb_job") == [(1,)]
    finally:
        for store in stores:
            store.close()


def test_concurrent_appends_under_one_lease_are_numbered_without_gaps(pg_url: str) -> None:
    """Four stores append 25 events each under one job lease at once: the 100 events are
    numbered 1..100 exactly once, in the order their numbers say."""
    key = generate_key()
    stores = [open_store(pg_url, keyring(key)) for _ in range(4)]
    try:
        stores[0].add_job("j", "warm", "k", "ops", "{}", time.time())
        lease = stores[0].claim_job("j", "A", 60)
        assert lease is not None
        barrier = threading.Barrier(4)
        seqs: list[int | None] = []

        def append(n: int) -> None:
            barrier.wait()
            for i in range(25):
                seqs.append(
                    stores[n].append_job_event(
                        "j", "phase_update", f'{{"n":{n},"i":{i}}}', lease=lease
                    )
                )

        threads = [threading.Thread(target=append, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(s for s in seqs if s is not None) == list(range(1, 101))
        events = stores[0].job_events("j")
        assert [e.seq for e in events] == list(range(1, 101))
        row = stores[0].job("j")
        assert row is not None and row.last_event == 100
    finally:
        for store in stores:
            store.close()
