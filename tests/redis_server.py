"""A real ``redis-server`` of the test's own on a free loopback port (never the machine's
6379), which a test may pause (SIGSTOP), resume and restart empty; stopped by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from support import free_port

#: Why the Redis tests cannot run here (None when they can).
MISSING = None if shutil.which("redis-server") else "redis-server (Debian package redis-server)"


def require_redis() -> None:
    """Skip naming what is missing; in CI (``CI`` set) fail instead: there these tests must run."""
    if MISSING is None:
        return
    message = f"{MISSING} is not installed; `make test` installs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class RedisServer:
    """``redis-server --port N --bind 127.0.0.1 --save "" --appendonly no`` (no persistence:
    a restart comes back empty)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="tb-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port})"

    def start(self) -> None:
        """Start it and wait (at most 10 s) until it answers PING."""
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                message = f"redis-server did not start on port {self.port}"
                if os.environ.get("CI"):
                    pytest.fail(message)
                pytest.skip(message)
            time.sleep(0.01)

    def answers(self) -> bool:
        """Whether it answers PING within 0.2 s."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (the worst case for clients)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop it by its PID (resumed first, so SIGTERM is handled) and wait for it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart_empty(self) -> None:
        """Stop and start again on the same port, with nothing in it."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop it and remove its folder."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
