"""Provider settings for the test authorization server (imported by tests and conftest)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tokenbroker.testing import AuthorizationServer

CLIENT_ID = "svc-client"
CLIENT_SECRET = "svc-secret"


def client_credentials(server: AuthorizationServer, **overrides: Any) -> dict[str, Any]:
    """Provider settings for the server's client-credentials client."""
    return {
        "grant": "client_credentials",
        "token_url": server.token_url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scopes": ["read"],
        **overrides,
    }


def refresh_token(server: AuthorizationServer, seed: str, **overrides: Any) -> dict[str, Any]:
    """Provider settings for a refresh-token credential seeded with ``seed``."""
    return {
        "grant": "refresh_token",
        "token_url": server.token_url,
        "client_id": "rt-client",
        "refresh_token": seed,
        **overrides,
    }


def login(server: AuthorizationServer, **overrides: Any) -> dict[str, Any]:
    """Provider settings for the server's login endpoint with both accounts."""
    return {
        "grant": "login",
        "login_url": server.login_url,
        "token_path": "data.token",
        "credentials": [
            {"username": "alice", "password": "alice-pw"},
            {"username": "bob", "password": "bob-pw"},
        ],
        **overrides,
    }


# A chunked request whose body breaks off after a first good chunk (proxy tests): the
# Transfer-Encoding value, and the bytes that follow that chunk.
CHUNKED_HEAD = (
    b"POST /api/upload HTTP/1.1\r\nHost: x\r\nX-Client: broken\r\n"
    b"Transfer-Encoding: %s\r\n\r\n5\r\nhello\r\n"
)
BROKEN_BODIES = {
    "bad-hex-size": (b"chunked", b"zz\r\nhello\r\n"),
    "size-overflow": (b"chunked", b"ffffffffffffffffffff\r\nhello\r\n"),
    "lf-only": (b"chunked", b"5\nhello\n0\n\n"),
    "bad-extension": (b"chunked", b'5;ext="open\r\nhello\r\n'),
    "xchunked": (b"xchunked", b"0\r\n\r\n"),
    "eof": (b"chunked", b""),  # the client just hangs up mid-body
}


def stampede(count: int, call: Callable[[], object]) -> list[object]:
    """Release ``count`` threads at once (a barrier) on ``call``; return each result or exception."""
    results: list[object] = [None] * count
    barrier = threading.Barrier(count)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


class Served:
    """An ASGI app served on 127.0.0.1 (``tokenbroker.testing.asgi.ServedApp``) with an httpx
    client for it, through the HTTP protocol ``serve`` uses."""

    def __init__(self, app: Any) -> None:
        import httpx

        from tokenbroker.api.connection import BoundedHeadProtocol
        from tokenbroker.testing.asgi import ServedApp

        self.app = app
        self._served = ServedApp(app, http=BoundedHeadProtocol).start()
        self.url = self._served.url
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def __enter__(self) -> Any:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self._served.stop()


def wait_for(
    condition: Callable[[], bool], what: str = "the condition", timeout: float = 10.0
) -> float:
    """Poll ``condition`` until it holds and return the seconds it took; fail naming ``what``
    after ``timeout`` seconds."""
    import time

    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    """The status of a GET of ``url``, or None when nothing answers."""
    import httpx

    try:
        return httpx.get(url, headers=headers, timeout=5).status_code
    except httpx.HTTPError:
        return None


def answers(url: str) -> bool:
    """A GET of ``url`` answers 200."""
    return http_status(url) == 200


def terminate(process: Any) -> str | None:
    """SIGTERM ``process`` (a ``subprocess.Popen``), wait up to 20 s (killing it if it is
    still running then) and return what it wrote to stderr, if that was piped."""
    import signal

    process.send_signal(signal.SIGTERM)
    try:
        err: str | None = process.communicate(timeout=20)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return err


class Serving:
    """A running `tokenbroker serve` (see :func:`serve_process`): its API URL, and once it has
    stopped, what it wrote to stderr."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stderr = ""


@contextlib.contextmanager
def serve_process(
    path: Path, config: dict[str, Any], *, mode: int = 0o600, timeout: float = 60
) -> Iterator[Serving]:
    """Write ``config`` (whose ``server.listen`` names a free port) to ``path`` at ``mode``, run
    `tokenbroker serve` on it until the block ends (SIGTERM), and check it exited 0.

    Yields:
        The running server, once its ``/livez`` answers 200.
    """
    import yaml

    path.write_text(yaml.safe_dump(config))
    path.chmod(mode)
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    serving = Serving("http://" + config["server"]["listen"])
    try:
        wait_for(lambda: http_status(serving.url + "/livez") == 200, "serve to listen", timeout)
        yield serving
    finally:
        serving.stderr = terminate(process) or ""
    assert process.returncode == 0, serving.stderr


class Lines:
    """The stdout lines of a subprocess, read by a thread so a test can wait with a bound."""

    def __init__(self, stream: Any) -> None:
        import queue

        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))

    def until(self, marker: str, timeout: float = 30.0) -> str:
        """The first line (from now on) containing ``marker``; AssertionError after ``timeout``."""
        import queue
        import time

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if marker in line:
                return line
        raise AssertionError(f"no {marker!r} within {timeout} s; got {self.seen}")

    def rest(self, timeout: float = 10.0) -> list[str]:
        """Every line seen, after the stream has ended (waits up to ``timeout`` for it)."""
        import queue

        self._thread.join(timeout)
        while True:
            try:
                self.seen.append(self._queue.get_nowait())
            except queue.Empty:
                return self.seen
