"""API: ``GET /v1/tokens/{provider}`` under load, against a bare constant-JSON endpoint.

What is measured. Two servers, each one uvicorn worker in its own process on 127.0.0.1:

* ``/v1/tokens``: the real thing, ``python -m tokenbroker.cli serve`` on a config with
  ``store: memory``, one ``client_credentials`` provider on a local
  ``tokenbroker.testing`` authorization server (tokens live 3600 s, so nothing refreshes
  during the run) and one consumer whose key may use it. It logs as ``serve`` does by
  default (JSON lines at info on stderr, here into a temporary file: an access line per
  request and an audit line per token read). The token is fetched once, by
  a request made before any measuring; the run fails unless the authorization server
  saw exactly that one token request by the end (every measured request is a cache hit).
* ``bare``: ``_api_server.py``, a FastAPI app with one route returning a constant
  ``JSONResponse`` shaped and sized like the token answer (the same keys, an access token
  of the same length), with the same ``Cache-Control``/``Pragma`` headers, logging and
  uvicorn options (uvloop, httptools, no access log). The difference between the two is
  tokenbroker's consumer authentication, rate-limit checks, ACL check, cache lookup,
  middleware and request logging.

Each server is pinned to core 1 and wrk (Debian's package; ``make bench-deps``) to
core 0 with ``taskset``; this process and the authorization server stay on core 0 too.
For 16 and then 64 connections, each endpoint gets a 2 s wrk warm-up (discarded) and
then an 8 s run: ``wrk -t1 -cN -d8s --latency``, with the consumer's key in an
``Authorization: Bearer`` header (sent to both servers alike). A run with any non-2xx
answer or socket error fails. ``--warmup`` and ``--duration`` change the seconds per run.

How to read the output. ``req/s`` is wrk's ``Requests/sec``; ``p50 ms`` and ``p99 ms``
are from its latency distribution (per request, open connections, no think time);
``x bare`` divides the token endpoint's req/s by the bare endpoint's at the same
connection count. ``cpu us/req`` is the server process's user+system CPU time during the
measured run divided by the requests wrk completed; it moves much less than req/s when
other processes compete for the cores, so compare it when the machine was busy. The goals
(at 16 connections): ``x bare`` at least 0.7 and p99 at most 10 ms. The last line is the
one-line summary; the exit status is 0 either way (it is non-zero only when the run
itself is invalid).

Tracing (``--tracing``). Two more ``serve`` processes on the same config plus
``telemetry: {otlp_endpoint: …}``, exporting over OTLP/gRPC to a sink in this process:
``/v1/tokens +trace`` records every request (``sample_ratio: 1.0``; an API span and a
token span each), ``/v1/tokens +trace 0%`` none (``sample_ratio: 0.0``). The summary adds
their req/s against the untraced ``/v1/tokens`` at the goal's connections and the CPU per
request tracing added.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import httpx

from _common import (
    CLIENT_ID,
    CLIENT_SECRET,
    PROVIDER,
    SCOPE,
    authorization_server,
    can_pin,
    free_port,
    pinned,
    render_table,
)
from _otlp_sink import Sink
from tokenbroker.engine.consumers import hash_key, new_key

CONNECTIONS = (16, 64)
WARMUP_SECONDS = 2
DURATION_SECONDS = 8
GOAL_RATIO = 0.7
GOAL_P99_MS = 10.0
GOAL_CONNECTIONS = 16
WRK_CORE = 0
SERVER_CORE = 1
STARTUP_SECONDS = 20.0
BARE_SERVER = Path(__file__).with_name("_api_server.py")
TRACED, UNSAMPLED = " +trace", " +trace 0%"

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True)
class Endpoint:
    """A running server: its label, URL and process."""

    label: str
    url: str
    process: subprocess.Popen[bytes]


@dataclass(frozen=True)
class Result:
    """One measured wrk run."""

    label: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    cpu_us: float | None = None


def config_yaml(token_url: str, key_digest: str, telemetry: str = "") -> str:
    """The served config: memory store, one provider, one consumer allowed to use it (and
    ``telemetry``, a flow mapping, when given)."""
    return f"""
store: memory
providers:
  {PROVIDER}:
    grant: client_credentials
    token_url: {token_url}
    client_id: {CLIENT_ID}
    client_secret: {CLIENT_SECRET}
    scopes: [{SCOPE}]
defaults:
  retries: 0
  timeout_seconds: 10
consumers:
  bench:
    api_key_sha256: {key_digest}
    allow: [{PROVIDER}]
""" + (f"telemetry: {telemetry}\n" if telemetry else "")


def start(label: str, command: Sequence[str], url: str, log: IO[bytes], pin: bool) -> Endpoint:
    """Start a server on :data:`SERVER_CORE`, its output going to ``log``."""
    process = subprocess.Popen(
        [*pinned(SERVER_CORE, pin), *command], stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    return Endpoint(label, url, process)


def first_answer(endpoint: Endpoint, headers: dict[str, str]) -> httpx.Response:
    """Wait until ``endpoint`` answers a GET (at most :data:`STARTUP_SECONDS`)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if endpoint.process.poll() is not None:
            raise SystemExit(f"{endpoint.label}: server exited ({endpoint.process.returncode})")
        try:
            return httpx.get(endpoint.url, headers=headers, timeout=10.0, trust_env=False)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"{endpoint.label}: no answer in {STARTUP_SECONDS:.0f} s"
                ) from None
            time.sleep(0.1)


def stop(endpoint: Endpoint) -> None:
    """End a server this run started, by its PID."""
    if endpoint.process.poll() is None:
        endpoint.process.terminate()
        try:
            endpoint.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            endpoint.process.kill()
            endpoint.process.wait(timeout=5)


def wrk(url: str, connections: int, seconds: int, key: str, pin: bool) -> str:
    """Run wrk once on :data:`WRK_CORE`; its output. Non-2xx answers or socket errors fail."""
    command = [
        *pinned(WRK_CORE, pin),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {key}",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    out = done.stdout
    if done.returncode != 0:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr.strip() or out}")
    bad = _NON_2XX.search(out)
    errors = _SOCKET.search(out)
    if bad or (errors and any(int(n) for n in errors.groups())):
        raise SystemExit(f"wrk saw failed requests at {url}:\n{out}")
    return out


def parse(out: str, label: str, connections: int) -> Result:
    """Requests/sec, the 50% and 99% latencies and the request count from wrk's output."""
    rps, total = _RPS.search(out), _TOTAL.search(out)
    latency = {p: float(v) * _UNITS_MS[unit] for p, v, unit in _LATENCY.findall(out)}
    if rps is None or total is None or set(latency) != {"50", "99"}:
        raise SystemExit(f"cannot parse wrk's output:\n{out}")
    return Result(
        label, connections, float(rps.group(1)), latency["50"], latency["99"], int(total.group(1))
    )


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds process ``pid`` has used (None without ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    endpoints: Sequence[Endpoint], key: str, warmup: int, duration: int, pin: bool
) -> list[Result]:
    """For each connection count, each endpoint: a discarded warm-up, then a measured run."""
    results = []
    for connections in CONNECTIONS:
        for endpoint in endpoints:
            if warmup:
                wrk(endpoint.url, connections, warmup, key, pin)
            before = cpu_seconds(endpoint.process.pid)
            out = wrk(endpoint.url, connections, duration, key, pin)
            after = cpu_seconds(endpoint.process.pid)
            result = parse(out, endpoint.label, connections)
            if before is not None and after is not None:
                result = replace(result, cpu_us=(after - before) / result.requests * 1e6)
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=WARMUP_SECONDS, help="Seconds, per run.")
    parser.add_argument("--duration", type=int, default=DURATION_SECONDS, help="Seconds, per run.")
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="Also serve with OpenTelemetry tracing, sampled and unsampled.",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make bench-deps` (apt-get install wrk)")
    started, load_before = time.monotonic(), os.getloadavg()[0]
    pin = can_pin(WRK_CORE, SERVER_CORE)
    if pin:
        # This process (and the authorization server's threads) stay off the server's core.
        os.sched_setaffinity(0, {WRK_CORE})
    key = new_key()
    auth = {"Authorization": f"Bearer {key}"}
    endpoints: list[Endpoint] = []
    with (
        Sink() as sink,
        authorization_server() as idp,
        tempfile.TemporaryDirectory(prefix="bench-api-") as tmp,
        open(Path(tmp, "servers.log"), "wb") as log,
    ):
        try:
            config = Path(tmp, "tokenbroker.yaml")
            config.write_text(config_yaml(idp.token_url, hash_key(key)))
            port = free_port()
            tokens = start(
                "/v1/tokens",
                [
                    *(sys.executable, "-m", "tokenbroker.cli", "--log-level", "warning"),
                    *("serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"),
                ],
                f"http://127.0.0.1:{port}/v1/tokens/{PROVIDER}",
                log,
                pin,
            )
            endpoints.append(tokens)
            warm = first_answer(tokens, auth)
            if warm.status_code != 200 or warm.headers.get("cache-control") != "no-store":
                raise SystemExit(f"/v1/tokens answered {warm.status_code}: {warm.text}")
            body = warm.json()
            body["access_token"] = "x" * len(body["access_token"])
            port = free_port()
            bare = start(
                "bare",
                [sys.executable, str(BARE_SERVER), str(port), json.dumps(body)],
                f"http://127.0.0.1:{port}/bare/{PROVIDER}",
                log,
                pin,
            )
            endpoints.append(bare)
            answer = first_answer(bare, auth)
            if answer.status_code != 200 or len(answer.content) != len(warm.content):
                raise SystemExit(f"bare answered {answer.status_code}: {answer.text}")
            for suffix, ratio in ((TRACED, 1.0), (UNSAMPLED, 0.0)) if args.tracing else ():
                traced = Path(tmp, f"tokenbroker-{ratio}.yaml")
                telemetry = f"{{otlp_endpoint: '{sink.url}', sample_ratio: {ratio}}}"
                traced.write_text(config_yaml(idp.token_url, hash_key(key), telemetry))
                port = free_port()
                more = start(
                    "/v1/tokens" + suffix,
                    [
                        *(sys.executable, "-m", "tokenbroker.cli", "--log-level", "warning"),
                        *("serve", "--config", str(traced), "--listen", f"127.0.0.1:{port}"),
                    ],
                    f"http://127.0.0.1:{port}/v1/tokens/{PROVIDER}",
                    log,
                    pin,
                )
                endpoints.append(more)
                if first_answer(more, auth).status_code != 200:
                    raise SystemExit(f"/v1/tokens{suffix} did not answer 200")
            served = [e for e in endpoints if e is not bare]
            results = measure([bare, *served], key, args.warmup, args.duration, pin)
            fetched = idp.count("client_credentials")
        except BaseException:
            log.flush()
            # The servers' own output, for the cause; its tail only (it holds request logs).
            sys.stderr.write(Path(tmp, "servers.log").read_text(errors="replace")[-4000:])
            raise
        finally:
            for endpoint in endpoints:
                stop(endpoint)
    if fetched != len(endpoints) - 1:  # one per serve
        raise SystemExit(f"the authorization server saw {fetched} token requests, not 1")
    report(results, args.duration, pin, time.monotonic() - started, load_before)


def report(results: list[Result], duration: int, pin: bool, elapsed: float, load: float) -> None:
    bare = {r.connections: r.rps for r in results if r.label == "bare"}
    rows = [
        [
            r.label,
            str(r.connections),
            f"{r.rps:,.0f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.rps / bare[r.connections]:.2f}",
            "-" if r.cpu_us is None else f"{r.cpu_us:.0f}",
        ]
        for r in results
    ]
    pinning = "server on core 1, wrk on core 0" if pin else "not pinned"
    print(
        f"api: wrk -t1, {duration} s per run after a warm-up, 1 uvicorn worker "
        f"({pinning}; CPython {platform.python_version()}, {os.cpu_count()} CPUs)"
    )
    print(
        render_table(
            ["endpoint", "conns", "req/s", "p50 ms", "p99 ms", "x bare", "cpu us/req"], rows
        )
    )
    print()

    ours = {r.connections: r for r in results if r.label == "/v1/tokens"}
    ratio = {c: r.rps / bare[c] for c, r in ours.items()}
    at = ours[GOAL_CONNECTIONS]
    goals = [
        (
            f"/v1/tokens >= {GOAL_RATIO:g}x bare req/s at {GOAL_CONNECTIONS} conns",
            f"{ratio[GOAL_CONNECTIONS]:.2f}x",
            ratio[GOAL_CONNECTIONS] >= GOAL_RATIO,
        ),
        (
            f"/v1/tokens p99 <= {GOAL_P99_MS:g} ms at {GOAL_CONNECTIONS} conns",
            f"{at.p99_ms:.1f} ms",
            at.p99_ms <= GOAL_P99_MS,
        ),
    ]
    print("goals:")
    for text, value, met in goals:
        print(f"  {text:<44} {value:>8}  {'met' if met else 'NOT met'}")
    cpu = {(r.label, r.connections): r.cpu_us for r in results}
    bare_cpu, our_cpu = cpu[("bare", GOAL_CONNECTIONS)], cpu[("/v1/tokens", GOAL_CONNECTIONS)]
    if bare_cpu and our_cpu:
        print(
            f"  (by server CPU per request at {GOAL_CONNECTIONS} conns: {bare_cpu / our_cpu:.2f}x "
            f"bare, {our_cpu - bare_cpu:.0f} us more per request; no goal)"
        )
    print("  token requests at the authorization server: 1 per serve (the warm-up)")
    tracing = tracing_cost(results)
    if tracing:
        print(f"  tracing: {tracing}")
    print(
        f"  run took {elapsed:.1f} s; 1-minute load average before it {load:.1f} (other busy "
        "processes make req/s and p99 noisy; cpu us/req much less so)"
    )
    print()
    met = all(ok for _, _, ok in goals)
    others = ", ".join(f"{ratio[c]:.2f}x at {c}" for c in CONNECTIONS if c != GOAL_CONNECTIONS)
    print(
        f"api: /v1/tokens {ratio[GOAL_CONNECTIONS]:.2f}x bare at {GOAL_CONNECTIONS} conns "
        f"(p99 {at.p99_ms:.1f} ms), {others} — goals {'met' if met else 'NOT met'}"
        + (f"; tracing: {tracing}" if tracing else "")
    )


def tracing_cost(results: list[Result]) -> str:
    """The tracing rows against ``/v1/tokens`` at the goal's connections: req/s ratio and
    added CPU per request; empty without ``--tracing`` rows."""
    by = {(r.label, r.connections): r for r in results}
    plain = by[("/v1/tokens", GOAL_CONNECTIONS)]
    parts = []
    for suffix, what in ((TRACED, "sampled"), (UNSAMPLED, "unsampled")):
        row = by.get(("/v1/tokens" + suffix, GOAL_CONNECTIONS))
        if row is None:
            continue
        extra = ""
        if row.cpu_us is not None and plain.cpu_us is not None:
            extra = f", {row.cpu_us - plain.cpu_us:+.0f} us CPU/req"
        parts.append(f"{what} {row.rps / plain.rps:.2f}x req/s{extra}")
    return f"at {GOAL_CONNECTIONS} conns {', '.join(parts)}" if parts else ""


if __name__ == "__main__":
    main()
