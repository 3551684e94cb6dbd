"""``python -m tokenbroker.testing``: the bundled authorization server on its own, for trying a config."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import yaml

from tokenbroker import Broker, parse_settings


def _read_until(lines: queue.Queue[str], marker: str, timeout: float = 20.0) -> list[str]:
    """Lines from ``lines`` up to and including the one containing ``marker``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        seen.append(line.rstrip("\n"))
        if marker in line:
            return seen
    raise AssertionError(f"no {marker!r} within {timeout} s; got {seen}")


def test_printed_providers_work_as_a_config_and_sigterm_stops_it() -> None:
    """The printed URLs answer, the printed providers block gets tokens for all three grants, SIGTERM exits 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenbroker.testing", "--expires-in", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    out: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [out.put(line) for line in proc.stdout or ()])
    reader.start()
    try:
        lines = _read_until(out, "Ctrl-C to stop")
        token_url = next(line.split()[-1] for line in lines if "token endpoint:" in line)
        assert token_url.startswith("http://127.0.0.1:")
        start = next(i for i, line in enumerate(lines) if line.startswith("providers:"))
        block = "\n".join(lines[start:-1])
        config = {"store": "memory", **yaml.safe_load(block)}
        assert set(config["providers"]) == {"test-cc", "test-rotating", "test-login"}
        broker = Broker(parse_settings(yaml.safe_dump(config), {}))
        try:
            for name in config["providers"]:
                token = broker.get_token(name)
                resource = httpx.get(
                    token_url.replace("/oauth/token", "/api/resource"),
                    headers={"Authorization": f"Bearer {token.access_token}"},
                )
                assert resource.status_code == 200, (name, resource.status_code)
        finally:
            broker.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert _read_until(out, "stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        proc.stdout.close()
        assert proc.stderr is not None
        proc.stderr.close()
