"""SQLite-only store tests: PRAGMAs, WAL, file modes, migrations, locking between processes,
real disk failures, damaged files and probe. The backend-generic guarantees are in
tokenbroker.testing.store_conformance (run by test_store_conformance.py)."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import client_credentials, refresh_token, wait_for
from tokenbroker import (
    Broker,
    EncryptionKeyError,
    ManualClock,
    Secret,
    StoreCorruptError,
    StoreError,
    parse_settings,
)
from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.store import Lease
from tokenbroker.store.sqlite import SQLiteStore
from tokenbroker.store.sqlite_schema import MIGRATIONS
from tokenbroker.testing import AuthorizationServer
from tokenbroker.testing.store_conformance import keyring, refresh, stored

# -- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def raw_db(path: Path) -> Iterator[sqlite3.Connection]:
    """A separate plain connection to the store's file (another process, or an attacker)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "tokenbroker.db"


@pytest.fixture
def file_store(db_path: Path, key: str) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(str(db_path), keyring(key))
    yield opened
    opened.close()


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", *args], capture_output=True, check=False)
    return result.returncode == 0


def _unmount(target: Path) -> None:
    if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (skips where mounting is not permitted)."""
    target = tmp_path / "small_fs"
    target.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=2m,mode=0700", "tokenbroker-test", str(target)):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield target
    finally:
        _unmount(target)


def fill(directory: Path) -> Path:
    """Write a filler file until the file system reports ENOSPC; returns it (delete to recover)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


# -- B9: storage settings, file mode, schema -----------------------------------------------------


def test_file_store_durability_pragmas(db_path: Path, key: str) -> None:
    """A file store runs WAL with synchronous=FULL and the configured busy timeout."""
    store = SQLiteStore(str(db_path), keyring(key), busy_timeout=0.25)
    try:
        pragmas = store.pragmas()
    finally:
        store.close()
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["synchronous"] == 2
    assert pragmas["busy_timeout"] == 250


def test_default_busy_timeout_is_positive(file_store: SQLiteStore) -> None:
    """Without a setting the busy timeout is still > 0, so a concurrent writer waits, not fails."""
    assert file_store.pragmas()["busy_timeout"] > 0


def test_store_files_are_owner_only(file_store: SQLiteStore, db_path: Path) -> None:
    """The database file (and its -wal/-shm companions) are created with mode 0600."""
    refresh(file_store, "c", "me", "RT", "AT")
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{db_path}{suffix}")
        assert path.exists(), suffix
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, suffix


def test_migration_is_idempotent(db_path: Path, key: str) -> None:
    """Opening the same file again keeps the latest schema version, the tables and the data."""
    first = SQLiteStore(str(db_path), keyring(key))
    refresh(first, "c", "me", "RT-1", "AT-1")
    first.close()
    second = SQLiteStore(str(db_path), keyring(key))
    try:
        row = second.load("c")
        assert row is not None
        assert row.refresh_token == Secret("RT-1")
    finally:
        second.close()
    with raw_db(db_path) as db:
        latest = str(len(MIGRATIONS))
        assert db.execute("SELECT name, value FROM tb_meta").fetchall() == [
            ("schema_version", latest)
        ]
        assert db.execute("SELECT count(*) FROM tb_credential").fetchone() == (1,)
        assert db.execute("SELECT count(*) FROM tb_attempt").fetchone() == (1,)


def test_older_schema_is_migrated_keeping_its_rows(db_path: Path, key: str) -> None:
    """A store at schema 3 (before scope/account) is migrated to the latest; its credential,
    attempt and sealed tokens survive and the new columns start empty."""
    with raw_db(db_path) as db:
        db.execute("CREATE TABLE tb_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for script in MIGRATIONS[:3]:
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
        db.execute("INSERT INTO tb_meta VALUES ('schema_version', '3')")
    old = SQLiteStore(str(db_path), keyring(key))  # migrates to the latest...
    refresh(old, "c", "A", "RT-1", "AT-1")
    old.close()
    with raw_db(db_path) as db:  # ...so put the row back into a schema-3 file
        db.execute("ALTER TABLE tb_credential DROP COLUMN scope")
        db.execute("ALTER TABLE tb_credential DROP COLUMN account")
        for table in ("tb_job", "tb_job_event", "tb_job_schedule"):  # migration 5 (jobs)
            db.execute(f"DROP TABLE {table}")
        db.execute("UPDATE tb_meta SET value = '3' WHERE name = 'schema_version'")
    store = SQLiteStore(str(db_path), keyring(key))
    try:
        row = store.load("c")
        (state,) = store.states()
        assert len(store.attempts("c")) == 1
    finally:
        store.close()
    assert row is not None and row.token is not None
    assert (row.refresh_token, row.token.token.access_token) == (Secret("RT-1"), "AT-1")
    assert (state["scope"], state["account"]) == (None, None)
    with raw_db(db_path) as db:
        assert db.execute("SELECT value FROM tb_meta WHERE name = 'schema_version'").fetchone() == (
            str(len(MIGRATIONS)),
        )


def test_newer_schema_is_refused(db_path: Path, key: str) -> None:
    """A store written by a newer tokenbroker (schema 99) is refused with a StoreError naming it."""
    SQLiteStore(str(db_path), keyring(key)).close()
    with raw_db(db_path) as db:
        db.execute("UPDATE tb_meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        SQLiteStore(str(db_path), keyring(key))
    with raw_db(db_path) as db:
        assert db.execute("SELECT value FROM tb_meta").fetchone() == ("99",)


_WRITER = """
import sys, time
from tokenbroker.core.crypto import Keyring
from tokenbroker.core.secret import Secret
from tokenbroker.store import StoredToken
from tokenbroker.store.sqlite import SQLiteStore
from tokenbroker.core.token import Token

path, key, owner, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = SQLiteStore(path, Keyring([Secret(key)]), busy_timeout=5.0)
while not __import__("os").path.exists(path + ".go"):
    time.sleep(0.001)
done = 0
while done < count:
    lease = store.acquire("shared", "prov", owner, 30)
    if lease is None:
        continue
    attempt = store.begin_attempt(lease)
    token = StoredToken(Token(f"AT-{owner}-{done}", "Bearer", time.time() + 60), 60, time.time(), "fp")
    if store.commit(lease, attempt, token, refresh_token=Secret(f"RT-{owner}-{done}")):
        done += 1
    store.release(lease)
store.close()
print(done)
"""


def test_two_processes_writing_concurrently_never_see_busy(db_path: Path, key: str) -> None:
    """Two processes each committing 40 fenced refreshes on one file: no SQLITE_BUSY, 80 versions."""
    SQLiteStore(str(db_path), keyring(key)).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db_path), key, f"p{i}", "40"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    time.sleep(0.3)
    Path(f"{db_path}.go").touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "40"
    store = SQLiteStore(str(db_path), keyring(key))
    try:
        row = store.load("shared")
        attempts = store.attempts("shared")
    finally:
        store.close()
    assert row is not None
    assert row.rt_version == 80
    assert [a.status for a in attempts] == ["succeeded"] * 80
    assert sorted(a.from_version for a in attempts) == list(range(80))


# -- D6: encryption at rest (the file's own bytes) ----------------------------------------------


def test_no_plaintext_canary_on_disk(db_path: Path, key: str) -> None:
    """After commits carrying canaries, no canary appears in the .db, -wal or -shm bytes."""
    canaries = [f"CANARY_{kind}_{uuid.uuid4().hex}" for kind in ("AT", "RT", "SEED", "RAW")]
    at, rt, seed, raw = canaries
    store = SQLiteStore(str(db_path), keyring(key))
    try:
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        lease = store.reseed(lease, Secret(seed), "digest")
        assert lease is not None
        attempt = store.begin_attempt(lease)
        body = f'{{"access_token":"{at}","refresh_token":"{rt}","x":"{raw}"}}'.encode()
        assert store.commit(lease, attempt, stored(at), refresh_token=Secret(rt), raw=body)
        files = [Path(f"{db_path}{suffix}") for suffix in ("", "-wal", "-shm")]
        assert all(f.exists() for f in files)
        for path in files:
            data = path.read_bytes()
            for canary in canaries:
                assert canary.encode() not in data, (path.name, canary)
    finally:
        store.close()
    data = db_path.read_bytes()
    assert len(data) > 0
    for canary in canaries:
        assert canary.encode() not in data


# -- store failures: clear classified errors, nothing half-written --------------------------------


def test_locked_beyond_busy_timeout_is_a_clear_error(db_path: Path, key: str) -> None:
    """While another connection holds the write lock, acquire fails after busy_timeout: 'locked'."""
    store = SQLiteStore(str(db_path), keyring(key), busy_timeout=0.2)
    try:
        refresh(store, "c", "A", "RT-1", "AT-1")
        with raw_db(db_path) as other:
            other.execute("BEGIN EXCLUSIVE")
            began = time.monotonic()
            with pytest.raises(StoreError, match="locked") as excinfo:
                store.acquire("new", "prov", "A", 30)
            assert time.monotonic() - began >= 0.15
            assert not isinstance(excinfo.value, sqlite3.Error)
            assert store.load("c") is not None  # readers are not blocked in WAL mode
            other.execute("ROLLBACK")
        assert store.load("new") is None
        assert store.acquire("new", "prov", "A", 30) is not None
        row = store.load("c")
        assert row is not None
        assert (row.rt_version, row.refresh_token) == (1, Secret("RT-1"))
    finally:
        store.close()


def _assert_unchanged(store: SQLiteStore, lease: Lease, attempt: int) -> None:
    row = store.load(lease.id)
    assert row is not None
    assert row.refresh_token == Secret("RT-1")
    assert row.token is not None
    assert row.token.token.access_token == "AT-1"
    assert (row.rt_version, row.lease_fence) == (1, lease.fence)
    statuses = {a.id: a.status for a in store.attempts(lease.id)}
    assert statuses[attempt] == "intent"  # not 'received': the whole transaction rolled back


def _begin_second_refresh(store: SQLiteStore) -> tuple[Lease, int]:
    refresh(store, "c", "A", "RT-1", "AT-1")
    lease = store.acquire("c", "prov", "A", 30)
    assert lease is not None
    attempt = store.begin_attempt(lease)
    assert attempt is not None
    return lease, attempt


def test_disk_full_by_page_limit_rolls_back_the_commit(file_store: SQLiteStore) -> None:
    """SQLITE_FULL (max_page_count) during commit: StoreError 'full', old tokens intact; retry works."""
    lease, attempt = _begin_second_refresh(file_store)
    pages = file_store.pragma("page_count")
    file_store.pragma("max_page_count", pages)
    big_reply = os.urandom(64 * 1024)
    with pytest.raises(StoreError, match="full"):
        file_store.commit(
            lease, attempt, stored("AT-2"), refresh_token=Secret("RT-2"), raw=big_reply
        )
    _assert_unchanged(file_store, lease, attempt)
    file_store.pragma("max_page_count", 1073741823)
    assert file_store.commit(
        lease, attempt, stored("AT-2"), refresh_token=Secret("RT-2"), raw=big_reply
    )
    assert file_store.load("c").refresh_token == Secret("RT-2")  # type: ignore[union-attr]


def test_full_file_system_rolls_back_the_commit(small_fs: Path, key: str) -> None:
    """A really full file system during commit: StoreError 'full', old tokens intact; then it heals."""
    store = SQLiteStore(str(small_fs / "tb.db"), keyring(key))
    try:
        lease, attempt = _begin_second_refresh(store)
        filler = fill(small_fs)
        with pytest.raises(StoreError, match="full"):
            store.commit(lease, attempt, stored("AT-2"), refresh_token=Secret("RT-2"), raw=b"r")
        _assert_unchanged(store, lease, attempt)
        with pytest.raises(StoreError, match="full"):
            store.acquire("other", "prov", "A", 30)
        assert store.load("other") is None
        filler.unlink()
        assert store.commit(lease, attempt, stored("AT-2"), refresh_token=Secret("RT-2"), raw=b"r")
        assert store.load("c").refresh_token == Secret("RT-2")  # type: ignore[union-attr]
    finally:
        store.close()


def test_read_only_mount_is_a_clear_error(small_fs: Path, tmp_path: Path, key: str) -> None:
    """The store's file seen through a read-only bind mount: writes fail 'read-only', nothing changes."""
    writable = SQLiteStore(str(small_fs / "tb.db"), keyring(key))
    view = tmp_path / "ro_view"
    view.mkdir()
    try:
        lease, attempt = _begin_second_refresh(writable)
        if not _mount("--bind", str(small_fs), str(view)):
            pytest.skip("bind mounts are not permitted here")
        try:
            if not _mount("-o", "remount,bind,ro", str(view)):
                pytest.skip("read-only remounts are not permitted here")
            read_only = SQLiteStore(str(view / "tb.db"), keyring(key))
            try:
                with pytest.raises(StoreError, match="read-only"):
                    read_only.commit(lease, attempt, stored("AT-2"), refresh_token=Secret("RT-2"))
                with pytest.raises(StoreError, match="read-only"):
                    read_only.acquire("other", "prov", "B", 30)
                row = read_only.load("c")
                assert row is not None
                assert row.refresh_token == Secret("RT-1")
            finally:
                read_only.close()
        finally:
            _unmount(view)
        _assert_unchanged(writable, lease, attempt)
        assert writable.load("other") is None
    finally:
        writable.close()


def test_read_only_connection_is_a_clear_error(file_store: SQLiteStore) -> None:
    """A store that may not write (query_only): StoreError 'read-only' and no change; then it heals."""
    lease, attempt = _begin_second_refresh(file_store)
    file_store.pragma("query_only", "ON")
    with pytest.raises(StoreError, match="read-only"):
        file_store.commit(lease, attempt, stored("AT-2"), refresh_token=Secret("RT-2"), raw=b"r")
    with pytest.raises(StoreError, match="read-only"):
        file_store.acquire("other", "prov", "B", 30)
    with pytest.raises(StoreError, match="read-only"):
        file_store.set_state(lease, "active")
    file_store.pragma("query_only", "OFF")
    _assert_unchanged(file_store, lease, attempt)
    assert file_store.load("other") is None
    assert file_store.commit(lease, attempt, stored("AT-2"), refresh_token=Secret("RT-2"), raw=b"r")


def test_garbage_file_is_store_corrupt(db_path: Path, key: str) -> None:
    """A file that is not SQLite at the store path: StoreCorruptError with a clear message."""
    db_path.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(StoreCorruptError, match="damaged") as excinfo:
        SQLiteStore(str(db_path), keyring(key))
    assert not isinstance(excinfo.value, sqlite3.Error)
    assert excinfo.value.__cause__ is None


def test_damaged_pages_are_store_corrupt(db_path: Path, key: str) -> None:
    """A SQLite file with overwritten pages: opening it is StoreCorruptError, not DatabaseError."""
    store = SQLiteStore(str(db_path), keyring(key))
    for i in range(20):
        refresh(store, f"c{i}", "A", f"RT-{i}", "AT" * 200)
    store.close()
    with db_path.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xa5" * 4096 * 3)

    def open_and_read() -> None:
        damaged = SQLiteStore(str(db_path), keyring(key))
        try:
            for i in range(20):
                damaged.load(f"c{i}")
        finally:
            damaged.close()

    with pytest.raises(StoreCorruptError):
        open_and_read()


def _open_fds(path: Path) -> int:
    target = str(path.resolve())
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == target
    return count


@pytest.mark.parametrize("damage", ["garbage", "newer-schema", "wrong-key"])
def test_failed_open_closes_the_file(db_path: Path, damage: str) -> None:
    """A store that refuses to open leaves no connection (file descriptor) behind."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    if damage == "garbage":
        db_path.write_bytes(b"not a database" * 300)
    else:
        store = SQLiteStore(str(db_path), keyring(generate_key()))
        refresh(store, "c", "A", "RT-1", "AT-1")
        store.close()
        if damage == "newer-schema":
            with raw_db(db_path) as db:
                db.execute("UPDATE tb_meta SET value = '99'")
    gc.disable()  # the leak must not depend on when the cycle collector happens to run
    try:
        for _ in range(3):
            with pytest.raises(StoreError if damage != "wrong-key" else EncryptionKeyError):
                SQLiteStore(str(db_path), keyring(generate_key()))
        assert _open_fds(db_path) == 0
    finally:
        gc.enable()


def test_missing_directory_is_a_store_error(tmp_path: Path, key: str) -> None:
    """A store path in a directory that does not exist is StoreError, not a raw OSError."""
    with pytest.raises(StoreError, match="cannot open"):
        SQLiteStore(str(tmp_path / "nope" / "tb.db"), keyring(key))


# -- B6-lite: the broker keeps serving while its store fails ---------------------------------------


def sqlite_of(broker: Broker) -> SQLiteStore:
    """The broker's store, which these tests open as a SQLite file."""
    assert isinstance(broker.store, SQLiteStore)
    return broker.store


class Breaker:
    """Makes a broker's file store fail for real and heal again."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.directory = directory
        self.broker: Broker | None = None
        self._filler: Path | None = None

    def break_(self) -> None:
        if self.kind == "full":
            self._filler = fill(self.directory)
        else:
            assert self.broker is not None
            sqlite_of(self.broker).pragma("query_only", "ON")

    def heal(self) -> None:
        if self._filler is not None:
            self._filler.unlink()
            self._filler = None
        if self.kind == "read-only":
            assert self.broker is not None
            sqlite_of(self.broker).pragma("query_only", "OFF")


@pytest.fixture(params=["full", "read-only"])
def breaker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Breaker]:
    if request.param == "full":
        yield Breaker("full", request.getfixturevalue("small_fs"))
    else:
        yield Breaker("read-only", tmp_path)


def file_broker(directory: Path, provider: dict[str, Any], **kwargs: Any) -> Broker:
    config = {
        "store": f"sqlite:///{directory / 'broker.db'}",
        "encryption_keys": [generate_key()],
        "defaults": {"retries": 2, "backoff_seconds": 0.01},
        "providers": {"p": provider},
    }
    return Broker(parse_settings(yaml.safe_dump(config), {}), **kwargs)


def slot_state(broker: Broker) -> str:
    (state,) = broker.states()
    return state.state


def test_broker_serves_from_memory_while_the_store_fails(
    auth_server: AuthorizationServer, breaker: Breaker
) -> None:
    """Store full/read-only at refresh-ahead: the held token keeps being served, then it recovers."""
    clock = ManualClock()
    broker = file_broker(breaker.directory, client_credentials(auth_server), clock=clock)
    breaker.broker = broker
    try:
        first = broker.get_token("p").access_token
        breaker.break_()
        clock.advance(3000)  # past refresh_ahead (0.8 x 3600 s), well before expiry
        assert broker.get_token("p").access_token == first
        wait_for(lambda: slot_state(broker) == "stale", "the background refresh to fail")
        assert broker.states()[0].last_error == "StoreError"
        assert broker.get_token("p").access_token == first
        assert auth_server.count("client_credentials") == 1  # nothing fetched that was not kept

        breaker.heal()
        clock.advance(2)  # past the failure backoff (at most 1 s after one failure)
        broker.get_token("p")
        wait_for(lambda: broker.get_token("p").access_token != first, "a refresh after recovery")
        assert slot_state(broker) == "valid"
        second = broker.get_token("p").access_token
        assert auth_server.count("client_credentials") == 2
        (row_id,) = [s["id"] for s in broker.store.states()]
        row = broker.store.load(row_id)
        assert row is not None
        assert row.token is not None
        assert row.token.token.access_token == second
    finally:
        broker.close()


def test_rotated_refresh_token_survives_a_failed_commit(
    auth_server: AuthorizationServer, breaker: Breaker
) -> None:
    """Store fails after the IdP rotated the RT: the new RT is kept and committed once it heals (B6)."""
    seed = auth_server.issue_refresh_token("rt-client")
    clock = ManualClock()
    armed = threading.Event()

    def hook(point: str) -> None:
        if point == "after_reply" and armed.is_set():
            armed.clear()
            breaker.break_()

    broker = file_broker(
        breaker.directory, refresh_token(auth_server, seed), clock=clock, hook=hook
    )
    breaker.broker = broker
    try:
        first = broker.get_token("p").access_token
        armed.set()
        clock.advance(3000)
        assert broker.get_token("p").access_token == first
        wait_for(lambda: slot_state(broker) == "stale", "the background commit to fail")
        assert broker.states()[0].last_error == "StoreError"
        assert broker.get_token("p").access_token == first
        assert len(auth_server.presented_refresh_tokens) == 2  # the IdP did rotate

        breaker.heal()
        clock.advance(2)
        broker.get_token("p")
        wait_for(lambda: slot_state(broker) != "refreshing", "the refresh after recovery")
        assert slot_state(broker) == "valid", broker.states()[0].last_error
        assert broker.get_token("p").access_token != first
        assert not auth_server.reused_refresh_tokens()

        clock.advance(3600)  # the stored refresh token is one the IdP still accepts
        assert broker.get_token("p").access_token != first
        assert not auth_server.reused_refresh_tokens()
    finally:
        broker.close()


def damage(path: Path, how: str) -> None:
    """Make the store at ``path`` unopenable in one of the ways probe must report."""
    if how == "not a database":
        path.write_bytes(b"this is not SQLite" * 100)
        return
    with sqlite3.connect(path, isolation_level=None) as db:
        if how == "schema too new":
            db.execute(f"UPDATE tb_meta SET value = '{len(MIGRATIONS) + 1}'")
        else:
            db.execute("UPDATE tb_signing_key SET private_ct = x'00'")
    db.close()


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("not a database", "damaged"),
        ("schema too new", f"schema version {len(MIGRATIONS) + 1}"),
        ("bad ciphertext", "not a valid ciphertext"),
    ],
)
def test_probe_reports_a_store_that_would_not_open(tmp_path: Path, how: str, words: str) -> None:
    """probe (what `tokenbroker check` runs) reports a damaged file, a newer schema or a bad
    ciphertext at `store`, reading only; a store it can open has no problems."""
    from tokenbroker.store import probe

    keyring = Keyring([Secret(generate_key())])
    path = tmp_path / "tb.db"
    store = SQLiteStore(str(path), keyring)
    store.add_signing_key("kid", "EdDSA", b"pem")
    store.close()
    assert probe(f"sqlite:///{path}", keyring) == []
    damage(path, how)
    before = path.read_bytes()
    (problem,) = probe(f"sqlite:///{path}", keyring)
    assert problem.path == "store" and words in problem.message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb.db"]


def test_probe_reads_a_store_another_process_has_open(tmp_path: Path) -> None:
    """With the store open elsewhere (its WAL file present), probe reads it read-only and still
    sees the key a secret written a moment ago is under."""
    from tokenbroker.store import probe

    keyring, other = Keyring([Secret(generate_key())]), Keyring([Secret(generate_key())])
    path = tmp_path / "tb.db"
    store = SQLiteStore(str(path), keyring)
    try:
        store.add_signing_key("kid", "EdDSA", b"pem")
        assert (tmp_path / "tb.db-wal").exists()
        assert probe(f"sqlite:///{path}", keyring) == []
        (problem,) = probe(f"sqlite:///{path}", other)
        assert problem.path == "encryption_keys" and keyring.primary_id in problem.message
        store.add_signing_key("kid-2", "EdDSA", b"pem")
    finally:
        store.close()


def test_store_errors_name_the_path_and_the_reason(tmp_path: Path) -> None:
    """A store that cannot open says which file and why: a missing folder, a damaged file, and a
    write refused at run time."""
    missing = tmp_path / "no-such-folder" / "tb.db"
    with pytest.raises(StoreError) as opened:
        SQLiteStore(str(missing), keyring(generate_key()))
    assert str(missing) in str(opened.value)
    assert "No such file or directory" in str(opened.value)

    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(StoreCorruptError) as corrupt:
        SQLiteStore(str(damaged), keyring(generate_key()))
    assert str(damaged) in str(corrupt.value)
    assert "damaged" in str(corrupt.value)

    path = tmp_path / "tb.db"
    store = SQLiteStore(str(path), keyring(generate_key()))
    try:
        store.pragma("query_only", "ON")
        with pytest.raises(StoreError) as refused:
            store.acquire("key", "prov", "A", 30)
        assert str(path) in str(refused.value)
        assert "read-only" in str(refused.value)
    finally:
        store.close()
