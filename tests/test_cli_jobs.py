"""Jobs through real ``tokenbroker serve`` processes and the CLI (issue 16 items 4, 10): a
SIGKILLed serve's job does not stay running, ``jobs watch`` follows a job to its end, and
``rotate-key`` without a server is a job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from click.testing import CliRunner

from support import client_credentials, free_port, login, serve_process, wait_for
from tokenbroker import Broker, BrokerClient, load_settings
from tokenbroker.cli.main import main
from tokenbroker.core.crypto import generate_key
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.jobs.service import JobService
from tokenbroker.testing import AuthorizationServer

ACCOUNTS = [(f"user{n}", f"user{n}-pw") for n in range(6)]


def config_for(server: AuthorizationServer, tmp_path: Path, key: str) -> dict[str, Any]:
    """A serve config: SQLite store, a login pool ``db`` of six accounts, consumer ``ops``
    (db + jobs), fast job leases."""
    for name, password in ACCOUNTS:
        server.add_account(name, password)
    credentials = [{"username": u, "password": p} for u, p in ACCOUNTS]
    return {
        "store": f"sqlite:///{tmp_path / 'tb.db'}",
        "encryption_keys": [generate_key()],
        "providers": {"db": login(server, credentials=credentials)},
        "consumers": {"ops": {"api_key_sha256": hash_key(key), "allow": ["db", "jobs"]}},
        "server": {"listen": f"127.0.0.1:{free_port()}"},
        "jobs": {"heartbeat_seconds": 0.2, "lease_seconds": 1.5, "poll_seconds": 0.05},
    }


def start_serve(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_sigkill_serve_mid_job_and_the_restarted_serve_takes_it_over(
    auth_server: AuthorizationServer, tmp_path: Path
) -> None:
    """SIGKILL a serve running a warm job over slow logins; a serve restarted on the same
    SQLite store takes the job from the dead owner within the lease time (1.5 s, polled
    with a 5 s margin for start-up) and finishes it done with every account logged in."""
    key = new_key()
    config = config_for(auth_server, tmp_path, key)
    path = tmp_path / "tb.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    url = "http://" + config["server"]["listen"]
    auth_server.latency = 0.3
    first = start_serve(path)
    try:
        wait_for(lambda: _status(url + "/livez") == 200, "the first serve to listen", 60)
        client = BrokerClient(url, api_key=key)
        job_id = client.start_job("warm", {"provider": "db", "concurrency": 1})["job_id"]
        wait_for(lambda: client.job(job_id)["items"]["ok"] >= 2, "two logins done", 30)
        dead_owner = client.job(job_id)["owner"]
        assert client.job(job_id)["status"] == "running"
        assert str(first.pid) in dead_owner
        client.close()
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    second = start_serve(path)
    try:
        wait_for(lambda: _status(url + "/livez") == 200, "the second serve to listen", 60)
        client = BrokerClient(url, api_key=key)
        took = wait_for(
            lambda: client.job(job_id)["owner"] != dead_owner,
            "the job to leave the dead owner",
            1.5 + 5,
        )
        assert took < 1.5 + 5
        wait_for(lambda: client.job(job_id)["status"] == "done", "the job to end done", 30)
        ended = client.job(job_id)
        assert ended["items"] == {"total": 6, "ok": 6, "failed": 0}
        client.close()
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def test_jobs_watch_prints_progress_and_exits_0_for_a_done_job(
    auth_server: AuthorizationServer, tmp_path: Path
) -> None:
    """`jobs start --follow` and `jobs watch` against a real serve print plain progress lines
    (stdout is not a terminal) ending with done, exit 0, and never print the API key;
    `jobs list` shows the job and `jobs show` its JSON."""
    key = new_key()
    config = config_for(auth_server, tmp_path, key)
    with serve_process(tmp_path / "tb.yaml", config) as serving:
        runner = CliRunner()
        env = {"TOKENBROKER_URL": serving.url, "TOKENBROKER_API_KEY": key}
        started = runner.invoke(
            main, ["jobs", "start", "warm", "--provider", "db", "--follow"], env=env
        )
        assert started.exit_code == 0, started.output
        job_id = started.output.split()[1]
        watched = runner.invoke(main, ["jobs", "watch", job_id], env=env)
        assert watched.exit_code == 0, watched.output
        for out in (started.output, watched.output):
            assert "fetch" in out and "done" in out.lower()
            assert key not in out
        listed = runner.invoke(main, ["jobs", "list"], env=env)
        assert listed.exit_code == 0 and job_id in listed.output
        shown = runner.invoke(main, ["jobs", "show", job_id], env=env)
        assert shown.exit_code == 0 and '"status": "done"' in shown.output
        missing = runner.invoke(main, ["jobs", "watch", "job_" + "D" * 22], env=env)
        assert missing.exit_code == 1 and "no such job" in missing.output
        retry = runner.invoke(main, ["jobs", "retry", job_id], env=env)
        assert retry.exit_code == 1 and "no failed retryable items" in retry.output


def test_rotate_key_without_a_server_is_a_job(
    auth_server: AuthorizationServer, tmp_path: Path
) -> None:
    """rotate-key with no server runs a rotate_key job in-process: the store then holds that
    job, done, with one item per secret re-encrypted."""
    old, new = generate_key(), generate_key()
    path = tmp_path / "tb.yaml"
    base = {
        "store": f"sqlite:///{tmp_path / 'tb.db'}",
        "providers": {"svc": client_credentials(auth_server)},
    }
    runner = CliRunner()
    path.write_text(yaml.safe_dump({**base, "encryption_keys": [old]}))
    assert runner.invoke(main, ["token", "svc", "--config", str(path)]).exit_code == 0
    path.write_text(yaml.safe_dump({**base, "encryption_keys": [new, old]}))
    rotated = runner.invoke(main, ["rotate-key", "--config", str(path)])
    assert rotated.exit_code == 0, rotated.output
    assert "re-encrypted 1 secret" in rotated.output
    broker = Broker(load_settings(path))
    try:
        jobs, _ = JobService(broker).list(kind="rotate_key")
        assert [(j.status.value, j.items.ok, j.requested_by) for j in jobs] == [("done", 1, "cli")]
    finally:
        broker.close()
