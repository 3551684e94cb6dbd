"""A throw-away PostgreSQL server for tests: ``initdb`` into a temporary folder, ``pg_ctl``.

:class:`PostgresServer` runs its *own* server on a free port of 127.0.0.1 with its socket in
its own folder, so a test may stop, kill or restart it without touching anything else (and
never the machine's own server on 5432)::

    with PostgresServer() as server:
        url = server.create_database()          # postgresql://postgres@127.0.0.1:PORT/tb_1
        ...
        server.stop()                           # an outage
        server.start()                          # the same data, the same port

PostgreSQL refuses to run as root: when we are root, ``initdb`` and ``pg_ctl`` run as the
``postgres`` user (``runuser``) and the folder is given to that user. Needs the server
binaries (Debian's ``postgresql`` package) and psycopg (``tokenbroker[postgres]``) for
:meth:`PostgresServer.create_database`. Traps avoided (reference/jobs-cluster-facts.md):
``pg_ctl`` always gets ``-l`` (without it, it writes to its stdout and a captured run hangs)
and ``-o "-p PORT"`` (without it the server comes up on 5432); a killed server is waited for
through ``/proc/PID/stat`` (a zombie still answers ``kill -0``).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bin_dir"]

#: Where Debian puts the server binaries (one folder per major version).
_DEBIAN_BINS = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(RuntimeError):
    """The server cannot be run here; the message names what is missing."""


def find_bin_dir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``pg_dump``.

    Looks at ``$PG_BIN``, then Debian's ``/usr/lib/postgresql/<newest>/bin``, then ``PATH``.

    Returns:
        The folder.

    Raises:
        PostgresUnavailable: No such folder; the message says how to install one.
    """
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(glob.glob(_DEBIAN_BINS), key=_major, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for folder in filter(None, candidates):
        if all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "pg_dump")):
            return Path(folder)
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (initdb, pg_ctl, pg_dump in $PG_BIN, "
        f"{_DEBIAN_BINS} or PATH): apt-get install postgresql (`make test` does it)"
    )


def _major(folder: str) -> int:
    version = Path(folder).parent.name
    return int(version) if version.isdigit() else 0


class PostgresServer:
    """One PostgreSQL server in a temporary folder, on a free port of 127.0.0.1.

    Args:
        bin_dir: The server binaries (default: :func:`find_bin_dir`).
        settings: Extra ``-c name=value`` server settings.

    Raises:
        PostgresUnavailable: The binaries are missing, or ``runuser``/the ``postgres`` user
            when running as root.
    """

    def __init__(self, bin_dir: Path | None = None, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.settings = {"fsync": "off", "max_connections": "200", **(settings or {})}
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres and (shutil.which("runuser") is None or not _has_user("postgres")):
            raise PostgresUnavailable("running as root needs runuser and a 'postgres' user")
        self.folder: Path | None = None
        self.port = 0
        self._databases = itertools.count(1)

    def __repr__(self) -> str:
        return f"PostgresServer(port={self.port}, pid={self.pid})"

    # -- life cycle -----------------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        self.initdb()
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def data(self) -> Path:
        """The data directory."""
        assert self.folder is not None, "initdb() first"
        return self.folder / "data"

    @property
    def log(self) -> Path:
        """The server's log file."""
        assert self.folder is not None, "initdb() first"
        return self.folder / "server.log"

    def initdb(self) -> None:
        """Create the folder (owned by ``postgres`` when we are root) and a cluster in it.

        Raises:
            PostgresUnavailable: ``initdb`` failed (its output is in the message).
        """
        self.folder = Path(tempfile.mkdtemp(prefix="tb-pg-"))
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.port = _free_port()

    def start(self) -> None:
        """Start the server (again, after :meth:`stop`: same data, same port); waits until it
        accepts connections.

        Raises:
            PostgresUnavailable: It did not start (the log's tail is in the message).
        """
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        """Stop the server by its PID (SIGINT: PostgreSQL's fast shutdown) and wait until the
        process is gone. A no-op when it is not running."""
        pid = self.pid
        if pid is None:
            return
        self._signal_and_wait(pid, signal.SIGINT, timeout=30)

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash) and wait until it is gone (its children follow)."""
        pid = self.pid
        if pid is not None:
            self._signal_and_wait(pid, signal.SIGKILL, timeout=10)

    def close(self) -> None:
        """Stop the server and delete its folder."""
        if self.folder is None:
            return
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs, else None."""
        if self.folder is None:
            return None
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    # -- databases ------------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL for ``database`` (the ``postgres`` superuser, no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[object, ...]]:
        """Run one statement outside a transaction as the superuser; its rows (if any)."""
        import psycopg  # noqa: PLC0415 - the optional 'postgres' extra

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"tb_{next(self._databases)}"
        self.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url`` made by :meth:`create_database`, closing its sessions."""
        name = url.rsplit("/", 1)[1].partition("?")[0]
        assert name.startswith("tb_"), name
        with contextlib.suppress(Exception):
            self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def dump(self, url: str) -> bytes:
        """``pg_dump`` of the database of ``url``: what a backup of it holds."""
        done = subprocess.run(  # noqa: S603 - our own binary, a URL we made
            [str(self.bin_dir / "pg_dump"), "--no-password", url.partition("?")[0]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {done.stderr.decode(errors='replace')}")
        return done.stdout

    # -- internals ------------------------------------------------------------------------------

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        # stdout and stderr go to a file, never a pipe: a server pg_ctl leaves running inherits
        # them, and a pipe it holds open would hang a captured run.
        assert self.folder is not None
        out = self.folder / f"{tool}.out"
        with out.open("wb") as sink:
            done = subprocess.run(  # noqa: S603 - the server's own binaries
                command,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
        if done.returncode != 0:
            tail = out.read_text(errors="replace")[-2000:]
            if self.folder is not None and self.log.exists():
                tail += self.log.read_text(errors="replace")[-2000:]
            raise PostgresUnavailable(f"{tool} exited {done.returncode}: {tail}")

    def _signal_and_wait(self, pid: int, sig: signal.Signals, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it answers ``kill -0`` but is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
