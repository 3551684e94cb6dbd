"""Chaos bench for cluster mode: 3 `serve` replicas on one PostgreSQL and one Redis.

Everything runs here on 127.0.0.1 and is stopped by PID at the end: a throw-away PostgreSQL
(:class:`tokenbroker.testing.postgres.PostgresServer`), a ``redis-server`` without
persistence, the bundled authorization server (single-use refresh tokens, reuse honoured
for 60 s like Tesla's grace, everything else refused and recorded), and three
``tokenbroker serve`` subprocesses. 600 asyncio callers (httpx, one request each per
second) are spread over the replicas for the whole run.

Per scenario it prints: token requests and expiries (a refresh is due every
``LIFETIME * REFRESH_AHEAD`` s; goal: one request per expiry), refresh tokens presented
twice outside the grace (the authorization server's own record; goal 0), callers' p50/p99,
503s and other errors. Scenarios: cold start; steady state over 5 expiries; SIGKILL of the
replica holding the lease mid-refresh (the token endpoint is slowed so there is a window);
Redis SIGSTOP 10 s then SIGCONT (``degraded`` must be seen and cleared on ``/health``);
Redis restarted empty; PostgreSQL stopped and started again. The whole run is bounded
(about 2 minutes) and ends with ONE summary line.

Run: ``cd bench && ../.venv/bin/python cluster.py``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from _common import free_port, render_table
from tokenbroker.core.crypto import generate_key
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.testing import AuthorizationServer, Fault
from tokenbroker.testing.postgres import PostgresServer

CALLERS = int(os.environ.get("BENCH_CALLERS", "600"))
REPLICAS = 3
LIFETIME = 10  # access-token lifetime, seconds
REFRESH_AHEAD = 0.5  # a refresh is due every 5 s
PERIOD = LIFETIME * REFRESH_AHEAD
GRACE = 60
PROVIDER = "tesla"
RUN_LIMIT = float(os.environ.get("BENCH_LIMIT", "240"))  # the whole run gives up after it


@dataclass
class Stats:
    """What the callers saw during one scenario."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    tokens: set[str] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)


class Redis:
    """A ``redis-server`` of our own on a free port, stopped by PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
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
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.2)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
        self.process = None


class Bench:
    """The servers, the replicas and the callers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.auth = AuthorizationServer(
            expires_in=LIFETIME, rotation="grace", reuse_grace_seconds=GRACE
        )
        self.auth.add_client("rt-client", None, auth_method="none", scopes=["read"])
        self.pg = PostgresServer()
        self.redis = Redis()
        self.key = new_key()
        self.ports = [free_port() for _ in range(REPLICAS)]
        self.replicas: list[subprocess.Popen[bytes] | None] = [None] * REPLICAS
        self.stats = Stats()
        self.stop = False

    def config(self) -> Path:
        seed = self.auth.issue_refresh_token("rt-client")
        config = {
            "store": self.pg.url("postgres") + "?timeout=2&max_size=4",
            "redis": self.redis.url,
            "encryption_keys": [generate_key()],
            "defaults": {"retries": 0, "deadline_seconds": 2, "lease_seconds": 6},
            "providers": {
                PROVIDER: {
                    "grant": "refresh_token",
                    "token_url": self.auth.token_url,
                    "client_id": "rt-client",
                    "refresh_token": seed,
                    "rotation": {"single_use": True, "reuse_grace_seconds": GRACE},
                    "skew_seconds": 1,
                    "refresh_ahead": REFRESH_AHEAD,
                }
            },
            "consumers": {
                "bench": {
                    "api_key_sha256": hash_key(self.key),
                    "allow": [PROVIDER],
                }
            },
            "server": {"rate_limit": "100000/second"},
            "telemetry": {"log_level": "error"},
        }
        path = self.folder / "tokenbroker.yaml"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def start_replica(self, i: int) -> None:
        self.replicas[i] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokenbroker.cli",
                "serve",
                "--config",
                str(self.folder / "tokenbroker.yaml"),
                "--listen",
                f"127.0.0.1:{self.ports[i]}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_live(self, i: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.ports[i]}/livez", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"replica {i} did not start")

    def close(self) -> None:
        for process in self.replicas:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.redis.stop()
        self.pg.close()
        self.auth.stop()

    async def caller(self, n: int, clients: list[httpx.AsyncClient]) -> None:
        client = clients[n % REPLICAS]
        headers = {"Authorization": f"Bearer {self.key}"}
        await asyncio.sleep(n / CALLERS)  # spread the first second
        while not self.stop:
            started = time.monotonic()
            stats = self.stats
            try:
                reply = await client.get(f"/v1/tokens/{PROVIDER}", headers=headers)
                stats.statuses[reply.status_code] += 1
                if reply.status_code == 200:
                    stats.tokens.add(reply.json()["access_token"])
            except httpx.HTTPError as exc:
                stats.statuses[0] += 1  # connection refused or reset (a killed replica)
                stats.errors[type(exc).__name__] += 1
            stats.latencies.append(time.monotonic() - started)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    async def health(self) -> set[str]:
        seen = set()
        async with httpx.AsyncClient(timeout=2) as client:
            for i, port in enumerate(self.ports):
                if self.replicas[i] is None:
                    continue
                try:
                    seen.add((await client.get(f"http://127.0.0.1:{port}/health")).json()["status"])
                except (httpx.HTTPError, ValueError, KeyError):
                    seen.add("unreachable")
        return seen

    def lease_owner_pid(self) -> int | None:
        rows = self.pg.execute(
            "SELECT lease_owner FROM tb_credential WHERE lease_owner IS NOT NULL"
        )
        return int(str(rows[0][0]).split(":")[1]) if rows else None


async def scenario(bench: Bench, name: str, seconds: float, chaos: object = None) -> list[str]:
    """Run the callers for ``seconds`` while ``chaos`` (a coroutine) runs; one table row."""
    bench.stats = stats = Stats()
    requests = bench.auth.count("refresh_token")
    notes: list[str] = []
    started = time.monotonic()
    task = asyncio.ensure_future(chaos) if chaos is not None else None  # type: ignore[arg-type]
    await asyncio.sleep(seconds)
    if task is not None:
        notes = await task
    elapsed = time.monotonic() - started
    made = bench.auth.count("refresh_token") - requests
    expiries = max(1, round(elapsed / PERIOD)) if name != "cold start" else 1
    reused = sum(use.outcomes.count("reused") for use in bench.auth.refresh_token_report())
    lat = sorted(stats.latencies) or [0.0]
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    ok = stats.statuses[200]
    s503 = stats.statuses[503]
    other = sum(c for s, c in stats.statuses.items() if s not in (200, 503))
    return [
        name, str(made), str(expiries), f"{made / expiries:.2f}", str(reused),
        f"{statistics.median(lat) * 1000:.1f}", f"{p99 * 1000:.1f}", str(ok), str(s503),
        str(other), "; ".join(notes + [f"{k} x{v}" for k, v in stats.errors.items()] or ["-"]),
    ]  # fmt: skip


async def kill_lease_holder(bench: Bench) -> list[str]:
    """Slow the token endpoint, wait for a refresh to arrive, SIGKILL whichever replica holds
    the lease, restart it later."""
    bench.auth.inject(Fault(delay=1.5), times=1)
    deadline = time.monotonic() + 3 * PERIOD
    while bench.auth.in_flight == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    pid = bench.lease_owner_pid()
    victim = next((i for i, p in enumerate(bench.replicas) if p and p.pid == pid), None)
    if victim is None:
        return ["no lease holder found"]
    process = bench.replicas[victim]
    assert process is not None
    process.kill()
    process.wait()
    bench.replicas[victim] = None
    await asyncio.sleep(8)
    bench.start_replica(victim)
    await asyncio.to_thread(bench.wait_live, victim)
    return [f"killed replica {victim} (pid {pid}) with the request at the provider"]


async def pause_redis(bench: Bench) -> list[str]:
    bench.redis.signal(signal.SIGSTOP)
    seen: set[str] = set()
    until = time.monotonic() + 10
    while time.monotonic() < until:
        seen |= await bench.health()
        await asyncio.sleep(0.5)
    bench.redis.signal(signal.SIGCONT)
    cleared = False
    until = time.monotonic() + 10
    while time.monotonic() < until and not cleared:
        cleared = await bench.health() == {"ok"}
        await asyncio.sleep(0.2)
    return [f"degraded seen: {'degraded' in seen}", f"cleared: {cleared}"]


async def restart_redis(bench: Bench) -> list[str]:
    bench.redis.stop()
    bench.redis.start()
    return ["restarted empty"]


async def restart_postgres(bench: Bench) -> list[str]:
    await asyncio.to_thread(bench.pg.stop)
    await asyncio.sleep(PERIOD + 1)  # long enough for a refresh to come due
    await asyncio.to_thread(bench.pg.start)
    ok = False
    until = time.monotonic() + 15
    while time.monotonic() < until and not ok:
        await asyncio.sleep(0.5)
        ok = bench.stats.statuses[200] > 0 and bench.stats.latencies[-1] < 1.0
    return ["stopped one period, started again; replicas not restarted"]


async def run(bench: Bench) -> list[list[str]]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    clients = [
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, limits=limits)
        for port in bench.ports
    ]
    callers = [asyncio.ensure_future(bench.caller(n, clients)) for n in range(CALLERS)]
    rows = [await scenario(bench, "cold start", 3)]
    rows.append(await scenario(bench, "steady, 5 expiries", 5 * PERIOD))
    rows.append(await scenario(bench, "SIGKILL lease holder", 14, kill_lease_holder(bench)))
    rows.append(await scenario(bench, "Redis SIGSTOP 10 s", 14, pause_redis(bench)))
    rows.append(await scenario(bench, "Redis restarted empty", 2 * PERIOD, restart_redis(bench)))
    rows.append(await scenario(bench, "PostgreSQL restart", 3 * PERIOD, restart_postgres(bench)))
    bench.stop = True
    await asyncio.gather(*callers, return_exceptions=True)
    for client in clients:
        await client.aclose()
    return rows


def main() -> None:
    for tool in ("redis-server",):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian package redis-server)")
    folder = Path(tempfile.mkdtemp(prefix="tb-cluster-"))
    bench = Bench(folder)
    try:
        bench.auth.start()
        bench.pg.initdb()
        bench.pg.start()
        bench.redis.start()
        bench.config()
        for i in range(REPLICAS):
            bench.start_replica(i)
        for i in range(REPLICAS):
            bench.wait_live(i)
        started = time.monotonic()
        rows = asyncio.run(asyncio.wait_for(run(bench), RUN_LIMIT))
    finally:
        bench.close()
        shutil.rmtree(folder, ignore_errors=True)
    head = ["scenario", "token req", "expiries", "req/expiry", "reused outside grace",
            "p50 ms", "p99 ms", "200", "503", "other err", "notes"]  # fmt: skip
    print(render_table(head, rows))
    worst = max(float(r[3]) for r in rows)
    reused = max(int(r[4]) for r in rows)
    p99 = max(float(r[6]) for r in rows)
    print(
        f"SUMMARY cluster: {len(rows)} scenarios, {CALLERS} callers on {REPLICAS} replicas, "
        f"{time.monotonic() - started:.0f} s: worst req/expiry {worst:.2f} (goal 1), "
        f"refresh tokens reused outside grace {reused} (goal 0), worst p99 {p99:.0f} ms"
    )


if __name__ == "__main__":
    main()
