"""Several OS processes sharing one SQLite store refresh a single-use refresh token once per expiry.

The workers are real processes (``process_worker.py``) talking to a real authorization
server on 127.0.0.1; what is asserted is what that server saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from process_worker import digest
from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.secret import Secret
from tokenbroker.store import open_store
from tokenbroker.testing import AuthorizationServer

WORKER = Path(__file__).with_name("process_worker.py")
PROVIDER = "rt"
PROCESSES = 4
THREADS = 250
LIFETIME = 1.0
REFRESH_AHEAD = 0.6
EXPIRIES = 20
# Workers stop once the server saw EXPIRIES + 1 refreshes (~12 s), or after this at most.
MAX_DURATION = 25.0
# Time for every worker to import and build its broker before the common start.
STARTUP = 2.0
EXIT_SLACK = 25.0


def settings_yaml(server: AuthorizationServer, seed: str, db: Path, key: str) -> str:
    """Settings for one rotating, single-use refresh-token credential on a shared store file."""
    config: dict[str, Any] = {
        "store": f"sqlite:///{db}",
        "encryption_keys": [key],
        "defaults": {
            "skew_seconds": 0.3,
            "refresh_ahead": REFRESH_AHEAD,
            "retries": 2,
            "backoff_seconds": 0.01,
            "deadline_seconds": 3,
            "lease_seconds": 8,
        },
        "providers": {
            PROVIDER: {
                "grant": "refresh_token",
                "token_url": server.token_url,
                "client_id": "rt-client",
                "refresh_token": seed,
                "rotation": {"single_use": True, "reuse_grace_seconds": 0},
            }
        },
    }
    return yaml.safe_dump(config)


def run_workers(
    tmp_path: Path,
    settings: str,
    *,
    count: int,
    threads: int,
    duration: float,
    pause: float = 0.01,
    stop_when: Callable[[], bool] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Start ``count`` worker processes together, wait for them, return their reports.

    The workers call for ``duration`` seconds at most, or until ``stop_when()`` (polled
    here) is true. Returns the reports and how long the workers were told to call.
    Asserts each worker exited 0 with a parseable report. Any worker still running when
    this returns or raises (a hang, a failed assertion) is killed by its PID.
    """
    start_at = time.time() + STARTUP
    stop_file = tmp_path / f"stop-{time.monotonic_ns()}"
    procs: list[subprocess.Popen[str]] = []
    try:
        for number in range(count):
            job = tmp_path / f"job-{time.monotonic_ns()}-{number}.json"
            job.write_text(
                json.dumps(
                    {
                        "settings": settings,
                        "provider": PROVIDER,
                        "start_at": start_at,
                        "duration": duration,
                        "stop_file": str(stop_file),
                        "threads": threads,
                        "pause": pause,
                    }
                )
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(job)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        window = duration
        if stop_when is not None:
            while time.time() < start_at + duration and not stop_when():
                time.sleep(0.02)
            stop_file.touch()
            window = min(time.time() - start_at, duration)
        reports = []
        for proc in procs:
            remaining = start_at + duration + EXIT_SLACK - time.time()
            out, err = proc.communicate(timeout=max(remaining, 1.0))
            assert proc.returncode == 0, f"worker {proc.pid} exited {proc.returncode}: {out}{err}"
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports, window
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def rt_server() -> Iterator[AuthorizationServer]:
    """A started strict-rotation server issuing 1-second access tokens."""
    server = AuthorizationServer(expires_in=int(LIFETIME), rotation="strict")
    server.add_client("rt-client", None, auth_method="none")
    with server:
        yield server


def test_processes_share_one_refresh_per_expiry(
    rt_server: AuthorizationServer, tmp_path: Path
) -> None:
    """4 processes x 250 callers over >= 20 expiries: one refresh per expiry, no token presented twice."""
    seed = rt_server.issue_refresh_token("rt-client")
    settings = settings_yaml(rt_server, seed, tmp_path / "tb.db", generate_key())

    reports, window = run_workers(
        tmp_path,
        settings,
        count=PROCESSES,
        threads=THREADS,
        duration=MAX_DURATION,
        stop_when=lambda: rt_server.count("refresh_token") >= EXPIRIES + 1,
    )

    assert [r["errors"] for r in reports] == [{}] * PROCESSES
    assert all(r["calls"] > THREADS * 10 for r in reports), [r["calls"] for r in reports]
    refreshes = rt_server.count("refresh_token")
    presented = rt_server.presented_refresh_tokens
    assert rt_server.reused_refresh_tokens() == set()
    assert len(presented) == refreshes
    assert len(set(presented)) == refreshes, "a refresh token was presented twice"
    assert presented[0] == seed
    # One refresh per token lifetime (at its refresh-ahead point), not one per process: the
    # first fetch, then one every LIFETIME * REFRESH_AHEAD seconds of the window, plus 2 of
    # slack (a refresh in flight when the workers were told to stop).
    per_expiry = window / (LIFETIME * REFRESH_AHEAD)
    assert refreshes >= EXPIRIES, (refreshes, window)
    assert refreshes <= 1 + per_expiry + 2, (refreshes, window)

    # The processes shared tokens: every token a worker saw was issued once for all of them.
    issued = {digest(t) for t in rt_server.issued_access_tokens}
    assert len(issued) == refreshes
    seen = [set(r["tokens"]) for r in reports]
    union = set().union(*seen)
    assert union <= issued
    assert len(union) >= refreshes - 1
    for tokens in seen:
        assert len(tokens) >= 0.8 * len(union), (len(tokens), len(union))


def test_restarted_process_uses_stored_token(tmp_path: Path) -> None:
    """4 cold processes make 1 request; a process started after they exit makes 0 (stored token)."""
    server = AuthorizationServer(expires_in=3600, rotation="strict")
    server.add_client("rt-client", None, auth_method="none")
    key = generate_key()
    db = tmp_path / "tb.db"
    with server:
        seed = server.issue_refresh_token("rt-client")
        settings = settings_yaml(server, seed, db, key)

        cold, _ = run_workers(tmp_path, settings, count=PROCESSES, threads=50, duration=0)
        assert server.count("refresh_token") == 1
        first = set().union(*(set(r["tokens"]) for r in cold))
        assert len(first) == 1

        restarted, _ = run_workers(tmp_path, settings, count=1, threads=1, duration=0)
        assert server.count("refresh_token") == 1
        assert set(restarted[0]["tokens"]) == first
        assert server.presented_refresh_tokens == [seed]

    store = open_store(f"sqlite:///{db}", Keyring([Secret(key)]))
    try:
        row = store.load(PROVIDER)
        assert row is not None
        assert row.state == "active"
        assert row.rt_version == 2  # the seed (version 1), then its one successor
        assert [a.status for a in store.attempts(PROVIDER)] == ["succeeded"]
    finally:
        store.close()
