"""``python -m tokenbroker.testing``: the bundled authorization server on its own, for trying a config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import yaml

from support import Lines
from tokenbroker import Broker, parse_settings


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
    out = Lines(proc.stdout)
    try:
        out.until("Ctrl-C to stop")
        lines = out.seen
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
        assert "stopped" in out.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
