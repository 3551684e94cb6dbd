"""The proxy streams bodies: 64 MiB up and down through ``tokenbroker proxy`` grow its peak RSS by < 16 MiB.

The proxy runs as its own process (the CLI, from a YAML config) so its memory can be
read from ``/proc/PID/status``; the upstream is a
:class:`~tokenbroker.testing.RecordingUpstream` on the test authorization server.
"""

from __future__ import annotations

import hashlib
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest
import yaml

from support import login
from tokenbroker.testing import AuthorizationServer, RecordingUpstream

MIB = 1 << 20
BODY = 64 * MIB
PIECE = 64 * 1024
MAX_GROWTH = 16 * MIB
STARTUP_SECONDS = 30.0

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads memory use from /proc"
)


def proxy_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m tokenbroker.cli``."""
    script = Path(sys.executable).with_name("tokenbroker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tokenbroker.cli"]


def memory_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", status, re.M)
    assert match, f"no {field} in /proc/{pid}/status"
    return int(match.group(1))


def pieces(total: int) -> Iterator[bytes]:
    """``total`` bytes in 64 KiB pieces, each piece different."""
    for offset in range(0, total, PIECE):
        yield offset.to_bytes(8, "big") * (min(PIECE, total - offset) // 8)


class ProxyProcess:
    """``tokenbroker proxy --config PATH`` as a child process; its announced URLs."""

    def __init__(self, config: Path, stderr: IO[bytes]) -> None:
        self.process = subprocess.Popen(
            [*proxy_command(), "proxy", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # keep draining so the child never blocks on stdout
            self.lines.put(line)

    def announced(self, what: str, timeout: float = STARTUP_SECONDS) -> str:
        """Wait for ``{what} listening on URL`` on stdout and return the URL."""
        pattern = re.compile(rf"^{what} listening on (http://127\.0\.0\.1:\d+)\s*$")
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"the proxy did not announce {what!r} in {timeout} s"
                ) from None
            if match := pattern.match(line):
                return match.group(1)

    def stop(self) -> int | None:
        """SIGTERM by PID, then SIGKILL if it is still running after 10 s; its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return None
        self._reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return self.process.returncode


def write_config(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> Path:
    config = {
        "store": "memory",
        "providers": {"db": login(auth_server)},
        "proxy": {
            "listen": "127.0.0.1:0",
            "health_listen": "127.0.0.1:0",
            "routes": [{"prefix": "/", "upstream": upstream.url, "provider": "db", "mode": "pool"}],
        },
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_64_mib_upload_and_download_stream_through_the_proxy(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """64 MiB each way arrive intact (size, SHA-256) while the proxy's peak RSS grows < 16 MiB."""
    with (
        RecordingUpstream(auth_server) as upstream,
        (tmp_path / "proxy.stderr").open("wb") as stderr,
    ):
        proxy = ProxyProcess(write_config(tmp_path, auth_server, upstream), stderr)
        try:
            url = proxy.announced("proxy")
            proxy.announced("health")
            with httpx.Client(base_url=url, timeout=60) as client:
                warm_up = client.post("/api/upload", content=pieces(MIB))
                assert warm_up.status_code == 200
                warm_down = client.get("/api/download", params={"bytes": MIB})
                assert len(warm_down.content) == MIB
                baseline = memory_kib(proxy.process.pid, "VmHWM")
                rss_before = memory_kib(proxy.process.pid, "VmRSS")

                sent = hashlib.sha256()

                def body() -> Iterator[bytes]:
                    for piece in pieces(BODY):
                        sent.update(piece)
                        yield piece

                upload = client.post("/api/upload", content=body())
                assert upload.status_code == 200
                assert upload.json() == {"bytes": BODY, "sha256": sent.hexdigest()}

                received = hashlib.sha256()
                size = 0
                with client.stream("GET", "/api/download", params={"bytes": BODY}) as download:
                    assert download.status_code == 200
                    for chunk in download.iter_raw(PIECE):
                        received.update(chunk)
                        size += len(chunk)
                expected = hashlib.sha256()
                cycle = bytes(range(251)) * PIECE  # a whole number of 251-byte periods
                for offset in range(0, BODY, len(cycle)):
                    expected.update(cycle[: BODY - offset])
                assert (size, received.hexdigest()) == (BODY, expected.hexdigest())

            peak = memory_kib(proxy.process.pid, "VmHWM")
            growth = (peak - baseline) * 1024
            assert growth < MAX_GROWTH, (
                f"peak RSS grew {growth / MIB:.1f} MiB (baseline peak {baseline} kB, "
                f"RSS before {rss_before} kB, peak after {peak} kB)"
            )
            assert {r.path for r in upstream.records()} == {"/api/upload", "/api/download"}
            assert proxy.stop() is not None, "the proxy ignored SIGTERM for 10 s"
        finally:
            proxy.stop()
