"""Nothing stays running after a crash (issue 16 item 4): a process running a job on a
SQLite file is SIGKILLed mid-job; a fresh service's reaper on the same file takes the job
over within the lease time — resuming an idempotent kind, failing any other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support import login, wait_for
from tokenbroker import Broker, parse_settings
from tokenbroker.config import JobsSettings
from tokenbroker.core.crypto import generate_key
from tokenbroker.jobs.model import JobStatus
from tokenbroker.jobs.service import JobService
from tokenbroker.testing import AuthorizationServer

HERE = Path(__file__).parent
ACCOUNTS = [(f"user{n}", f"user{n}-pw") for n in range(6)]
JOBS = {"heartbeat_seconds": 0.2, "lease_seconds": 1.5, "poll_seconds": 0.05}


def _logins(server: AuthorizationServer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in server.requests:
        if record.grant == "login" and isinstance(record.json, dict):
            counts[record.json["username"]] = counts.get(record.json["username"], 0) + 1
    return counts


@pytest.mark.parametrize(
    ("kind", "ending"), [("warm", JobStatus.DONE), ("refresh", JobStatus.FAILED)]
)
def test_sigkill_mid_job_then_a_fresh_reaper_takes_it_over(
    auth_server: AuthorizationServer, tmp_path: Path, kind: str, ending: JobStatus
) -> None:
    """SIGKILL the process mid-job: within the lease time the job leaves running — warm
    (idempotent) is resumed from its remaining accounts and ends done; refresh ends
    failed with error.type worker_lost."""
    for name, password in ACCOUNTS:
        auth_server.add_account(name, password)
    auth_server.latency = 0.25
    credentials = [{"username": u, "password": p} for u, p in ACCOUNTS]
    settings = yaml.safe_dump(
        {
            "store": f"sqlite:///{tmp_path / 'tb.db'}",
            "encryption_keys": [generate_key()],
            "providers": {"db": login(auth_server, credentials=credentials)},
        }
    )
    spec = tmp_path / "spec.json"
    params = {"provider": "db", **({"concurrency": 1} if kind == "warm" else {})}
    spec.write_text(
        json.dumps({"settings": settings, "kind": kind, "params": params, "jobs": JOBS})
    )
    child = subprocess.Popen(
        [sys.executable, str(HERE / "jobs_worker.py"), str(spec)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )
    broker = Broker(parse_settings(settings, {}))
    service = JobService(broker, settings=JobsSettings(**JOBS), owner="fresh")
    try:
        assert child.stdout is not None
        job_id = json.loads(child.stdout.readline())["job_id"]
        wait_for(
            lambda: (j := service.get(job_id)) is not None and j.items.ok >= 2,
            "the child to finish two items",
        )
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        killed_at = time.monotonic()
        before = service.require(job_id)
        assert before.status is JobStatus.RUNNING and before.owner == "doomed"
        done_before = before.items.ok
        auth_server.reset_records()
        service.start_background()
        wait_for(
            lambda: (
                service.require(job_id).owner != "doomed" or service.require(job_id).status.final
            ),
            "the reaper to take the job over",
        )
        assert time.monotonic() - killed_at <= JOBS["lease_seconds"] + 1.0
        wait_for(lambda: service.require(job_id).status.final, "the job to end", 20)
        job = service.require(job_id)
        assert job.status is ending
        if kind == "warm":
            assert (job.items.total, job.items.ok, job.progress) == (6, 6, 100.0)
            asked = _logins(auth_server)
            # Resumed from its remaining items: at most the one in flight at the kill again.
            assert sum(asked.values()) <= len(ACCOUNTS) - done_before + 1
        else:
            assert job.error is not None and job.error.type == "worker_lost"
            assert _logins(auth_server) == {}
            assert service.events(job_id)[-1].name == "error"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        service.stop_background()
        broker.close()
