"""Chaos bench for cluster mode: 3 `serve` replicas on one PostgreSQL and one Redis.

Everything runs here on 127.0.0.1 and is stopped by PID at the end: a throw-away PostgreSQL
(:class:`tokenbroker.testing.postgres.PostgresServer`), a ``redis-server`` without
persistence, the bundled authorization server (single-use refresh tokens, reuse honoured
for 60 s like Tesla's grace, everything else refused and recorded), and three
``tokenbroker serve`` subprocesses. 600 callers (``BENCH_CALLERS``; httpx, one request each
per second, caller *n* on replica *n* mod 3) run in ``BENCH_WORKERS`` caller processes (4 by
default), so the load generator is not one saturated Python process; this process only
runs the authorization server and the chaos.

Per scenario it prints, from the authorization server's own record:

* ``token req``: every refresh-token request that reached it (raw, nothing left out);
* ``in-doubt resends``: presentations it honoured as a repeat inside the reuse grace
  (``accepted_in_grace``) matched by the broker's own record of resending an in-doubt refresh
  (``tb_attempt``: a second attempt from one refresh-token version after the first was closed
  in doubt) — the protocol's documented recovery (reference step 7) after a holder died with
  its request at the provider, whose reply (the rotated token) died with it;
* ``expiries``: token generations actually replaced — distinct refresh tokens presented for
  the first time (each was issued with one access token whose refresh-ahead point came), not
  wall-clock periods; a refresh that could not start (PostgreSQL down) is one late expiry;
* ``req/expiry``: (token req - in-doubt resends) / expiries (goal: exactly 1);
* ``gaps s``: shortest and longest time between consecutive generations (first
  presentations); a refresh-ahead is due every lifetime x refresh_ahead = 5 s, so a gap near
  5 s is on time and a longer one late (PostgreSQL down); ``early`` counts gaps under half a
  period, a second refresh of one period in disguise (goal 0);
* ``reused outside grace``: presentations refused as reuse (goal 0);
* callers' p50/p99 (and p99 against the steady state's), 200s, 503s, other errors.

Scenarios: cold start; steady state; SIGKILL of the replica holding the lease mid-refresh
(the token endpoint is slowed so there is a window); Redis SIGSTOP 10 s then SIGCONT
(``degraded`` must be seen and cleared on ``/health``; goal: p99 < 1 s); Redis restarted
empty; PostgreSQL stopped and started again. The whole run is bounded (about 2 minutes) and
ends with ONE summary line.

Run: ``cd bench && ../.venv/bin/python cluster.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from _common import free_port, render_table
from tokenbroker.core.crypto import generate_key
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.testing import AuthorizationServer, Fault
from tokenbroker.testing.postgres import PostgresServer

CALLERS = int(os.environ.get("BENCH_CALLERS", "600"))
WORKERS = max(1, int(os.environ.get("BENCH_WORKERS", "4")))
REPLICAS = 3
LIFETIME = 10  # access-token lifetime, seconds
REFRESH_AHEAD = 0.5  # a refresh is due 5 s after a token was issued
PERIOD = LIFETIME * REFRESH_AHEAD
GRACE = 60
#: The replicas' PostgreSQL pool timeout (short, so an outage answers 503 quickly).
STORE_TIMEOUT = float(os.environ.get("BENCH_STORE_TIMEOUT", "2"))
PROVIDER = "tesla"
RUN_LIMIT = float(os.environ.get("BENCH_LIMIT", "240"))  # the whole run gives up after it

#: One caller request: (wall-clock start, seconds taken, HTTP status or 0, what went wrong:
#: an error class, or the status and error code of a non-200 answer; "" when served).
Sample = tuple[float, float, int, str]


# -- the caller processes ------------------------------------------------------------------


def caller_process(
    worker: int, ports: list[int], key: str, ready: Any, go: Any, stop: Any, out: Any
) -> None:
    """One caller process: callers ``worker``, ``worker + WORKERS``, … until ``stop``; puts
    its samples on ``out``."""
    samples: list[Sample] = asyncio.run(_callers(worker, ports, key, ready, go, stop))
    out.put(samples)


async def _callers(
    worker: int, ports: list[int], key: str, ready: Any, go: Any, stop: Any
) -> list[Sample]:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    clients = [
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, limits=limits)
        for port in ports
    ]
    samples: list[Sample] = []
    headers = {"Authorization": f"Bearer {key}"}
    ready.put(worker)
    await asyncio.to_thread(go.wait)

    async def caller(n: int) -> None:
        client = clients[n % REPLICAS]
        await asyncio.sleep(n / CALLERS)  # spread the first second
        while not stop.is_set():
            wall, started = time.time(), time.monotonic()
            try:
                reply = await client.get(f"/v1/tokens/{PROVIDER}", headers=headers)
                code = "" if reply.status_code == 200 else _error_code(reply)
                samples.append((wall, time.monotonic() - started, reply.status_code, code))
            except httpx.HTTPError as exc:  # connection refused or reset (a killed replica)
                samples.append((wall, time.monotonic() - started, 0, type(exc).__name__))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    await asyncio.gather(*(caller(n) for n in range(worker, CALLERS, WORKERS)))
    for client in clients:
        await client.aclose()
    return samples


def _error_code(reply: httpx.Response) -> str:
    """``503 store_unavailable``: the status and the error body's code, for the notes."""
    try:
        code = reply.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "?"
    return f"{reply.status_code} {code}"


# -- the authorization server's record, timestamped ----------------------------------------


class Timeline:
    """Polls the authorization server's record (every 5 ms, in a thread) and timestamps each
    refresh-token presentation."""

    def __init__(self, auth: AuthorizationServer) -> None:
        self.auth = auth
        self.presented: list[tuple[float, str]] = []  # (first seen, token), arrival order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._poll_once()

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self._poll_once()

    def _poll_once(self) -> None:
        now = time.time()
        presented = self.auth.presented_refresh_tokens
        self.presented += [(now, t) for t in presented[len(self.presented) :]]


def grace_repeats(auth: AuthorizationServer) -> tuple[int, int]:
    """(presentations honoured inside the grace, presentations refused as reuse) so far."""
    report = auth.refresh_token_report()
    return (
        sum(use.accepted_in_grace for use in report),
        sum(use.outcomes.count("reused") for use in report),
    )


@dataclass
class Window:
    """One scenario: its wall-clock span, the record's positions at its ends, notes."""

    name: str
    start: float
    end: float = 0.0
    presented: tuple[int, int] = (0, 0)
    in_grace: tuple[int, int] = (0, 0)
    reused: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


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
    """The servers, the replicas, the caller processes and the scenarios' windows."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.auth = AuthorizationServer(
            expires_in=LIFETIME, rotation="grace", reuse_grace_seconds=GRACE
        )
        self.auth.add_client("rt-client", None, auth_method="none", scopes=["read"])
        self.timeline = Timeline(self.auth)
        self.pg = PostgresServer()
        self.redis = Redis()
        self.key = new_key()
        self.ports = [free_port() for _ in range(REPLICAS)]
        self.replicas: list[subprocess.Popen[bytes] | None] = [None] * REPLICAS
        self.windows: list[Window] = []

    def config(self) -> Path:
        seed = self.auth.issue_refresh_token("rt-client")
        config = {
            "store": self.pg.url("postgres") + f"?timeout={STORE_TIMEOUT}&max_size=4",
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

    async def serving(self) -> bool:
        """Whether every running replica answers a token read with 200 within 1 s."""
        headers = {"Authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(timeout=1) as client:
            for i, port in enumerate(self.ports):
                if self.replicas[i] is None:
                    continue
                try:
                    url = f"http://127.0.0.1:{port}/v1/tokens/{PROVIDER}"
                    if (await client.get(url, headers=headers)).status_code != 200:
                        return False
                except httpx.HTTPError:
                    return False
        return True

    def recoveries(self) -> list[float]:
        """When each resend of an in-doubt refresh started, from the broker's own record: an
        attempt from the same refresh-token version as an earlier attempt that was left in
        doubt (its holder died, or timed out after sending) and closed by the takeover."""
        rows = self.pg.execute(
            "SELECT a.started_at FROM tb_attempt a WHERE EXISTS (SELECT 1 FROM tb_attempt b"
            " WHERE b.credential_id = a.credential_id AND b.from_version = a.from_version"
            " AND b.id < a.id AND b.status IN ('superseded', 'in_doubt'))"
        )
        return [float(row[0]) for row in rows]


async def scenario(bench: Bench, name: str, seconds: float, chaos: object = None) -> None:
    """Run for ``seconds`` while ``chaos`` (a coroutine) runs; record the window."""
    window = Window(name, time.time())
    # The first window also owns whatever a replica fetched before the callers began.
    since = len(bench.auth.presented_refresh_tokens) if bench.windows else 0
    window.presented = (since, 0)
    first = grace_repeats(bench.auth)
    task = asyncio.ensure_future(chaos) if chaos is not None else None  # type: ignore[arg-type]
    await asyncio.sleep(seconds)
    if task is not None:
        window.notes = await task
    window.end = time.time()
    last = grace_repeats(bench.auth)
    window.presented = (window.presented[0], len(bench.auth.presented_refresh_tokens))
    window.in_grace, window.reused = (first[0], last[0]), (first[1], last[1])
    bench.windows.append(window)


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies) or [0.0]
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def rows_for(bench: Bench, samples: list[Sample], recoveries: list[float]) -> list[list[str]]:
    """One table row per window, from the authorization server's record (timestamped by
    :class:`Timeline`), the broker's recovery attempts, and the callers' samples."""
    timeline = bench.timeline
    seen: set[str] = set()
    rows = []
    steady_p99: float | None = None
    for window in bench.windows:
        presented = timeline.presented[window.presented[0] : window.presented[1]]
        made = len(presented)
        firsts = []
        for at, token in presented:
            if token not in seen:
                seen.add(token)
                firsts.append(at)
        expiries = len(firsts)
        in_grace = window.in_grace[1] - window.in_grace[0]
        recovered = sum(window.start <= at < window.end for at in recoveries)
        resends = min(in_grace, recovered)
        # Gaps between consecutive generations (first presentations), this window's first
        # one measured from the last one before it: a refresh-ahead every PERIOD s.
        earlier = [at for at, _ in timeline.presented if at < window.start]
        gaps = [b - a for a, b in itertools.pairwise(([max(earlier)] if earlier else []) + firsts)]
        early = sum(gap < 0.5 * PERIOD for gap in gaps)
        if os.environ.get("BENCH_DEBUG"):
            print(window.name, [f"+{at - window.start:.2f}" for at in firsts], gaps)
        mine = [s for s in samples if window.start <= s[0] < window.end]
        latencies = [s[1] for s in mine]
        if os.environ.get("BENCH_DEBUG"):
            slow = sorted(mine, key=lambda sample: -sample[1])[:12]
            shown = [f"+{a - window.start:.2f}:{d:.2f}" for a, d, *_ in slow]
            print(window.name, "slowest:", shown)
        statuses = Counter(s[2] for s in mine)
        errors = Counter(s[3] for s in mine if s[3])
        tail = p99(latencies)
        if window.name.startswith("steady"):
            steady_p99 = tail
        ratio = f"{tail / steady_p99:.1f}" if steady_p99 else "-"
        notes = list(window.notes)
        if in_grace != recovered:
            notes.append(f"in-grace repeats {in_grace}, in-doubt resends in the store {recovered}")
        notes += [f"{k} x{v}" for k, v in errors.items()]
        rows.append(
            [
                window.name, str(made), str(resends), str(expiries),
                f"{(made - resends) / max(1, expiries):.2f}", str(early),
                f"{min(gaps):.1f}-{max(gaps):.1f}" if gaps else "-",
                str(window.reused[1] - window.reused[0]),
                f"{statistics.median(latencies or [0.0]) * 1000:.1f}", f"{tail * 1000:.1f}",
                ratio, str(statuses[200]), str(statuses[503]),
                str(sum(c for s, c in statuses.items() if s not in (200, 503))),
                "; ".join(notes or ["-"]),
            ]
        )  # fmt: skip
    return rows


def find_holder(bench: Bench, deadline: float) -> int | None:
    """The replica holding the lease while a refresh request is at the provider, or None."""
    import psycopg

    with psycopg.connect(bench.pg.url("postgres"), autocommit=True) as conn:
        bench.auth.inject(Fault(delay=1.5), times=1)  # once we are watching
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT lease_owner FROM tb_credential WHERE lease_owner IS NOT NULL"
            ).fetchone()
            if row is not None and bench.auth.in_flight > 0:
                pid = int(str(row[0]).split(":")[1])
                for i, process in enumerate(bench.replicas):
                    if process is not None and process.pid == pid:
                        return i
            time.sleep(0.005)
    return None


async def first_token(bench: Bench) -> list[str]:
    """Cold start: after the 3 s, wait (up to 30 s) until the first token was issued, so
    the cold start owns its one request even when the replicas are slow to send it."""
    until = time.monotonic() + 30
    while time.monotonic() < until and not bench.auth.issued_access_tokens:
        await asyncio.sleep(0.05)
    return []


async def kill_lease_holder(bench: Bench) -> list[str]:
    """Slow the token endpoint (below the 2 s deadline, so the holder would not give up by
    itself), watch the lease on one open connection, SIGKILL the replica holding it while its
    request is at the provider, restart it 8 s later."""
    victim = await asyncio.to_thread(find_holder, bench, time.monotonic() + 4 * PERIOD)
    if victim is None:
        return ["no lease holder found while the request was at the provider"]
    process = bench.replicas[victim]
    assert process is not None
    process.kill()
    process.wait()
    bench.replicas[victim] = None
    await asyncio.sleep(8)
    restarted = time.monotonic()
    bench.start_replica(victim)
    await asyncio.to_thread(bench.wait_live, victim)
    return [
        f"killed replica {victim} with its request at the provider, restarted 8 s later"
        f" (up after {time.monotonic() - restarted:.0f} s)"
    ]


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
    until = time.monotonic() + 15
    ok = False
    while time.monotonic() < until and not ok:
        await asyncio.sleep(0.5)
        ok = await bench.serving()
    return [f"stopped {PERIOD + 1:.0f} s; replicas not restarted; recovered: {ok}"]


async def run(bench: Bench) -> None:
    await scenario(bench, "cold start", 3, first_token(bench))
    await scenario(bench, "steady, 5 periods", 5 * PERIOD)
    await scenario(bench, "SIGKILL lease holder", 14, kill_lease_holder(bench))
    await scenario(bench, "Redis SIGSTOP 10 s", 14, pause_redis(bench))
    await scenario(bench, "Redis restarted empty", 2 * PERIOD, restart_redis(bench))
    await scenario(bench, "PostgreSQL restart", 3 * PERIOD, restart_postgres(bench))
    await asyncio.sleep(1)  # a refresh that came due at the very end is recorded


def start_callers(bench: Bench) -> tuple[list[Any], Any, Any, Any]:
    """Start the caller processes; return them once each is ready, and the go/stop events
    and the samples queue."""
    context = multiprocessing.get_context("spawn")
    ready, out = context.Queue(), context.Queue()
    go, stop = context.Event(), context.Event()
    processes = [
        context.Process(
            target=caller_process,
            args=(w, bench.ports, bench.key, ready, go, stop, out),
            daemon=True,
        )
        for w in range(WORKERS)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=60)
    return processes, go, stop, out


def main() -> None:
    for tool in ("redis-server",):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian package redis-server)")
    folder = Path(tempfile.mkdtemp(prefix="tb-cluster-"))
    bench = Bench(folder)
    processes: list[Any] = []
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
        processes, go, stop, out = start_callers(bench)
        bench.timeline.start()
        started = time.monotonic()
        go.set()
        try:
            asyncio.run(asyncio.wait_for(run(bench), RUN_LIMIT))
        finally:
            stop.set()
            samples: list[Sample] = []
            for _ in processes:
                samples += out.get(timeout=60)
            for process in processes:
                process.join(30)
            bench.timeline.close()
        recoveries = bench.recoveries()
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        bench.close()
        shutil.rmtree(folder, ignore_errors=True)
    rows = rows_for(bench, samples, recoveries)
    head = ["scenario", "token req", "in-doubt resends", "expiries", "req/expiry", "early",
            "gaps s", "reused outside grace", "p50 ms", "p99 ms", "p99/steady", "200", "503",
            "other err", "notes"]  # fmt: skip
    print(render_table(head, rows))
    worst = max(float(r[4]) for r in rows)
    raw = max(int(r[1]) / max(1, int(r[3])) for r in rows)
    resends = sum(int(r[2]) for r in rows)
    reused = sum(int(r[7]) for r in rows)
    early = sum(int(r[5]) for r in rows)
    paused = next(float(r[9]) for r in rows if r[0].startswith("Redis SIGSTOP"))
    span = bench.windows[-1].end - bench.windows[0].start
    rate = sum(1 for sample in samples if sample[0] < bench.windows[-1].end) / span
    print(
        f"SUMMARY cluster: {len(rows)} scenarios, {CALLERS} callers in {WORKERS} processes on "
        f"{REPLICAS} replicas, {time.monotonic() - started:.0f} s, {rate:.0f} of {CALLERS} "
        f"requests/s achieved: worst req/expiry "
        f"{worst:.2f} excluding {resends} in-doubt resend(s) inside the grace (raw worst "
        f"{raw:.2f}; goal 1), early refreshes {early} (goal 0), refresh tokens reused outside "
        f"grace {reused} (goal 0), Redis SIGSTOP p99 {paused:.0f} ms (goal < 1000), worst p99 "
        f"{max(float(r[9]) for r in rows):.0f} ms"
    )


if __name__ == "__main__":
    main()
