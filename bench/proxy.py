"""Proxy: tokenbroker's token-injecting reverse proxy under load, against nginx doing the same.

What is measured. One upstream and three ways to reach it, all on 127.0.0.1:

* ``direct``: the upstream itself, an nginx with one worker answering every path with a
  constant ``{"ok":true}`` (``application/json``) over keep-alive connections that never
  close. It is the ceiling: what wrk and the upstream manage with no proxy between them.
* ``nginx``: an nginx with one worker as the reference reverse proxy: ``proxy_pass`` to
  the upstream over a ``keepalive 64`` pool (HTTP/1.1, no ``Connection`` header), with
  ``proxy_set_header Authorization "Bearer <token>"`` (a real login token from the same
  authorization server) and no access log. Both nginx configs are in
  ``_proxy_upstream.py``; each runs as its own foreground nginx under a temporary prefix.
* ``tokenbroker pool`` and ``tokenbroker shared``: one ``tokenbroker proxy`` process
  (``python -m tokenbroker.cli proxy``, default logging, its stderr in a temporary file)
  with two routes to the same upstream: ``/pool/`` leases one token of a ``login``
  provider with 70 accounts to each client connection (tokens outnumber the connections,
  so no connection waits for one), ``/shared/`` puts the current token of a
  ``client_credentials`` provider on every request. Both providers use a local
  ``tokenbroker.testing`` authorization server inside this process; it is hit only at
  start-up (tokens live an hour), which is checked at the end by its request counts.

Every path asks the upstream for the same ``/bench`` (through ``/pool/bench`` and
``/shared/bench`` on tokenbroker). Before measuring, each path is checked: the status and
body match the upstream's, and the ``Authorization`` header that reaches the upstream is
the expected one (none direct; the fixed token through nginx; an issued login token in
pool mode; an issued access token in shared mode).

wrk (Debian's package), this process and the upstream are pinned to core 0 with
``taskset``, the proxy under test to core 1. For 16 and then 64 connections, each target
gets a 2 s wrk warm-up (discarded) and then an 8 s run: ``wrk -t1 -cN -d8s --latency``
(``--warmup`` and ``--duration`` change the seconds). Before every pool-mode run, the
bench waits until the proxy's ``/health`` shows no lease in use (the previous run's
connections have been released); half-way through the measured run it reads how many are
in use: one per connection and none waiting, or the run is invalid (wrk does not count a
connection that never gets an answer as an error).

How to read the output. ``req/s`` is wrk's ``Requests/sec``; ``p50 ms`` and ``p99 ms`` are
from its latency distribution (open connections, no think time). ``x direct`` and ``x
nginx`` divide a row's req/s by the direct and the nginx row's at the same connection
count; wrk and the upstream share core 0, so when nginx comes near ``direct`` its req/s
is their limit rather than nginx's, and ``cpu us/req`` compares the two proxies better.
``cpu us/req`` is the proxy's user+system CPU time (all its processes) during the
measured run divided by the requests wrk completed; it moves much less than req/s when
other processes compete for the cores, so compare it when the machine was busy.
``others %`` says how busy it was: the share of the two cores' time (stolen time included)
that went to anything but this run's processes (wrk, the upstream, the proxy, this
script) during the measured run; loopback interrupt work the kernel does not charge to a
process lands there too, so a few percent is normal, and above ~20% req/s and p99 say
more about the neighbours than about the proxy (the summary then says so). The goals (at
64 connections, for both modes): tokenbroker at least 0.5x nginx's req/s and a p99 at most
2x nginx's. The last line is the one-line summary.

Tracing (``--tracing``). Two more ``tokenbroker proxy`` processes on the same config plus
``telemetry: {otlp_endpoint: …}``, exporting over OTLP/gRPC to a sink in this process (it
accepts each batch as raw bytes): ``+trace`` records every request
(``sample_ratio: 1.0``), ``+trace 0%`` none (``sample_ratio: 0.0``: spans are started,
not recorded, and the ``traceparent`` still goes upstream). Their rows sit beside the
untraced ones; the summary then adds, for the shared route at 64 connections, req/s
against the untraced proxy and the CPU per request tracing added (``cpu us/req``
minus the untraced row's) — for an unsampled trace that is the whole cost of tracing
being on. The exit status is 0 whether or not the
goals are met; it is non-zero when the run is invalid: a run with a non-2xx answer or a
socket error, pool leases not released between runs, a failed check before measuring,
token requests after start-up, a proxy that cannot start or is not there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import httpx

from _common import (
    CLIENT_ID,
    CLIENT_SECRET,
    SCOPE,
    authorization_server,
    can_pin,
    free_port,
    pinned,
    render_table,
)
from _otlp_sink import Sink
from _proxy_upstream import (
    BODY,
    ECHO_PATH,
    nginx_binary,
    nginx_conf,
    nginx_version,
    reference_http,
    start_nginx,
    upstream_http,
)
from tokenbroker.proxy import compiled as proxy_compiled

CONNECTIONS = (16, 64)
WARMUP_SECONDS = 2
DURATION_SECONDS = 8
ACCOUNTS = 70
GOAL_CONNECTIONS = 64
GOAL_RATIO = 0.5
GOAL_P99_RATIO = 2.0
LOAD_CORE = 0
PROXY_CORE = 1
STARTUP_SECONDS = 60.0
IDLE_SECONDS = 10.0
BUSY_SHARE = 0.2
BENCH_PATH = "/bench"
PROXY_COMMAND = (sys.executable, "-m", "tokenbroker.cli", "proxy")
# The proxy runs on this interpreter: `make bench` uses the mypyc-compiled install
# (`make compiled`); `.venv/bin/python bench/proxy.py` measures the pure-Python sources.
BUILD = "compiled with mypyc" if proxy_compiled() else "pure Python"
DIRECT, NGINX, POOL, SHARED = "direct", "nginx", "tokenbroker pool", "tokenbroker shared"
OURS = (POOL, SHARED)
TRACED, UNSAMPLED = " +trace", " +trace 0%"
HEADER = (
    "target",
    "conns",
    "req/s",
    "p50 ms",
    "p99 ms",
    "x direct",
    "x nginx",
    "cpu us/req",
    "others %",
)

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_LISTENING = re.compile(r"\b(proxy|health) listening on (http://\S+)")

Probe = tuple[int | None, str | None]


@dataclass(frozen=True)
class Target:
    """One way to the upstream: its label, the URL wrk loads, and the proxy in between."""

    label: str
    url: str
    process: subprocess.Popen[bytes] | None = None
    health_url: str | None = None


@dataclass(frozen=True)
class Result:
    """One measured wrk run; ``error`` says why it is invalid."""

    label: str
    connections: int
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    cpu_us: float | None = None
    in_use: int | None = None
    others: float | None = None
    error: str | None = None


@dataclass
class Proxy:
    """The running ``tokenbroker proxy``: its process, URLs and what it printed."""

    process: subprocess.Popen[bytes]
    urls: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)


def proxy_available() -> bool:
    """Whether this tokenbroker has the ``proxy`` command."""
    command = [*PROXY_COMMAND, "--help"]
    return subprocess.run(command, capture_output=True, timeout=60).returncode == 0


def proxy_yaml(login_url: str, token_url: str, upstream: int, telemetry: str = "") -> str:
    """The proxy's config: a pool route on a login provider, a shared one on a service client
    (and ``telemetry``, a flow mapping, when given)."""
    accounts = "\n".join(f"      - {{username: u{i}, password: p{i}}}" for i in range(ACCOUNTS))
    return f"""
store: memory
providers:
  db:
    grant: login
    login_url: {login_url}
    token_path: data.token
    credentials:
{accounts}
  svc:
    grant: client_credentials
    token_url: {token_url}
    client_id: {CLIENT_ID}
    client_secret: {CLIENT_SECRET}
    scopes: [{SCOPE}]
proxy:
  listen: 127.0.0.1:0
  health_listen: 127.0.0.1:0
  routes:
    - {{prefix: /pool/, upstream: "http://127.0.0.1:{upstream}/", provider: db, mode: pool}}
    - {{prefix: /shared/, upstream: "http://127.0.0.1:{upstream}/", provider: svc, mode: shared}}
""" + (f"telemetry: {telemetry}\n" if telemetry else "")


def start_proxy(config: Path, pin: bool, log: IO[bytes]) -> Proxy:
    """Run ``tokenbroker proxy`` on :data:`PROXY_CORE`; return once it printed both URLs."""
    command = [*PROXY_COMMAND, "--config", str(config)]
    process = subprocess.Popen(
        [*pinned(PROXY_CORE, pin), *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    proxy = Proxy(process)

    def read() -> None:
        # Drains stdout for the whole run, so a chatty proxy never blocks on a full pipe.
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            proxy.lines.append(line)
            if match := _LISTENING.search(line):
                proxy.urls[match.group(1)] = match.group(2).rstrip("/")
                if len(proxy.urls) == 2:
                    proxy.ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not proxy.ready.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            said = "\n".join(proxy.lines[-20:])
            raise SystemExit(
                f"tokenbroker proxy did not print both URLs in {STARTUP_SECONDS:.0f} s "
                f"(exit status {process.returncode}); its stdout:\n{said}"
            )
    return proxy


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (nginx's worker, any child of the proxy)."""
    found = [pid]
    for parent in found:
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                found += [int(child) for child in children.read_text().split()]
    return found


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds used by ``pid`` and its descendants (None without /proc)."""
    total = 0.0
    for each in descendants(pid):
        try:
            stat = Path(f"/proc/{each}/stat").read_text()
        except OSError:
            if each == pid:
                return None
            continue
        fields = stat.rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a process this run started, and any it started, by PID."""
    if process.poll() is not None:
        return
    family = descendants(process.pid)
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
        for pid in family[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def fetch(url: str) -> httpx.Response:
    """One GET on a fresh connection."""
    return httpx.get(url, timeout=10.0, trust_env=False)


def pool_stats(health_url: str) -> dict[str, Any]:
    """The ``pool`` object of the proxy's ``/health`` answer."""
    pool = fetch(f"{health_url}/health").json().get("pool")
    if not isinstance(pool, dict):
        raise SystemExit(f"/health has no pool object: {fetch(f'{health_url}/health').text}")
    return pool


def wait_idle(health_url: str) -> str | None:
    """Wait until no pool lease is in use (the last run's are released); None or what's wrong."""
    deadline = time.monotonic() + IDLE_SECONDS
    try:
        while (in_use := pool_stats(health_url)["in_use"]) != 0:
            if time.monotonic() > deadline:
                return f"{in_use} pool leases still in use {IDLE_SECONDS:.0f} s after a run"
            time.sleep(0.05)
    except httpx.HTTPError as exc:
        return f"/health failed: {exc!r}"
    return None


def leases(health_url: str, connections: int) -> tuple[int | None, str | None]:
    """Pool leases in use, and what is wrong: a connection waiting, or not one lease each.

    wrk does not count a connection that never gets an answer as an error, so this is
    how a run with connections stuck in the pool's queue is told from a valid one.
    """
    try:
        pool = pool_stats(health_url)
    except httpx.HTTPError as exc:
        return None, f"/health failed half-way: {exc!r}"
    in_use, waiting = int(pool["in_use"]), int(pool["waiting"])
    if waiting or in_use != connections:
        return in_use, f"half-way {in_use} leases in use and {waiting} waiting for {connections}"
    return in_use, None


def wrk(
    url: str,
    connections: int,
    seconds: int,
    pin: bool,
    probe: Callable[[], Probe] | None = None,
) -> tuple[str, Probe | None]:
    """Run wrk once on :data:`LOAD_CORE`; its output and what ``probe`` said half-way."""
    command = [
        *pinned(LOAD_CORE, pin),
        *("wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        seen = None
        if probe is not None:
            time.sleep(seconds / 2)
            seen = probe()
        out, err = process.communicate(timeout=seconds + 30)
    if process.returncode != 0:
        raise SystemExit(f"wrk failed ({process.returncode}): {err.decode().strip()}")
    return out.decode(), seen


def failures(out: str) -> str | None:
    """What wrk counted as failed: non-2xx answers and socket errors (None when none)."""
    found = []
    if bad := _NON_2XX.search(out):
        found.append(f"{bad.group(1)} non-2xx")
    if errors := _SOCKET.search(out):
        for kind, count in zip(
            ("connect", "read", "write", "timeout"), errors.groups(), strict=True
        ):
            if int(count):
                found.append(f"{count} {kind} errors")
    return ", ".join(found) or None


def parse(out: str, label: str, connections: int) -> Result:
    """Requests/sec, the 50% and 99% latencies and the request count from wrk's output."""
    rps, total = _RPS.search(out), _TOTAL.search(out)
    latency = {p: float(v) * _UNITS_MS[unit] for p, v, unit in _LATENCY.findall(out)}
    if rps is None or total is None or set(latency) != {"50", "99"}:
        return Result(label, connections, error=f"cannot parse wrk's output: {out!r}")
    return Result(
        label,
        connections,
        float(rps.group(1)),
        latency["50"],
        latency["99"],
        int(total.group(1)),
        error=failures(out),
    )


def machine_busy(cores: Sequence[int] | None) -> float | None:
    """CPU seconds ``cores`` (None: all) have been busy since boot, stolen time included."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    names = {"cpu"} if cores is None else {f"cpu{core}" for core in cores}
    total = 0
    for line in lines:
        name, *fields = line.split()
        if name in names:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            total += user + nice + system + irq + softirq + steal
    return total / os.sysconf("SC_CLK_TCK")


def others_seconds(cores: Sequence[int] | None, pids: Sequence[int]) -> float | None:
    """CPU seconds ``cores`` have been busy minus what this run's processes used.

    This run's processes: this one (the authorization server's threads too), its reaped
    children (each wrk) and the process trees under ``pids``.
    """
    busy = machine_busy(cores)
    if busy is None:
        return None
    for usage in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        used = resource.getrusage(usage)
        busy -= used.ru_utime + used.ru_stime
    for pid in pids:
        seconds = cpu_seconds(pid)
        if seconds is None:
            return None
        busy -= seconds
    return busy


def run(
    target: Target,
    upstream: subprocess.Popen[bytes],
    connections: int,
    seconds: tuple[int, int],
    pin: bool,
) -> Result:
    """A discarded warm-up, then a measured run with CPU times around it.

    Args:
        target: What wrk loads.
        upstream: The upstream nginx, whose CPU time counts as this run's own.
        connections: wrk's ``-c``.
        seconds: The warm-up's and the measured run's.
        pin: Whether wrk is pinned.

    Returns:
        The result; ``error`` is set when the run is invalid.
    """
    warmup, duration = seconds
    process = target.process
    if process is not None and process.poll() is not None:
        return Result(target.label, connections, error=f"exited ({process.returncode})")
    health = target.health_url if target.label.startswith(POOL) else None
    if warmup:
        if health and (stuck := wait_idle(health)):
            return Result(target.label, connections, error=stuck)
        wrk(target.url, connections, warmup, pin)
    if health and (stuck := wait_idle(health)):
        return Result(target.label, connections, error=stuck)
    pids = [upstream.pid] + ([] if process is None else [process.pid])
    proxy_before = None if process is None else cpu_seconds(process.pid)
    cores = (LOAD_CORE, PROXY_CORE) if pin else None
    others_before = others_seconds(cores, pids)
    probe = (lambda: leases(health, connections)) if health else None
    out, seen = wrk(target.url, connections, duration, pin, probe)
    others_after = others_seconds(cores, pids)
    proxy_after = None if process is None else cpu_seconds(process.pid)
    result = parse(out, target.label, connections)
    if seen is not None:
        in_use, wrong = seen
        result = replace(result, in_use=in_use, error=result.error or wrong)
    if proxy_before is not None and proxy_after is not None and result.requests:
        result = replace(result, cpu_us=(proxy_after - proxy_before) / result.requests * 1e6)
    if others_before is not None and others_after is not None:
        share = (others_after - others_before) / (
            (len(cores or ()) or os.cpu_count() or 1) * duration
        )
        result = replace(result, others=max(0.0, share))
    return result


def check(target: Target, want: str, tokens: Callable[[], Sequence[str]]) -> None:
    """The target answers like the upstream, which sees ``Bearer`` and one of ``tokens()``.

    ``tokens`` is called after the request: a proxy may fetch its token on the first one.
    """
    base = target.url.removesuffix(BENCH_PATH)
    answer = fetch(target.url)
    if answer.status_code != 200 or answer.text != BODY:
        raise SystemExit(f"{target.label}: {answer.status_code} {answer.text!r}, not {BODY}")
    echo = fetch(base + ECHO_PATH)
    seen = echo.text.removeprefix("Bearer ") if echo.text else ""
    if echo.status_code != 200 or seen not in tokens() or (seen and seen == echo.text):
        raise SystemExit(
            f"{target.label}: the upstream saw Authorization {echo.text!r} "
            f"({echo.status_code}), not {want}"
        )


def login(url: str, username: str, password: str) -> str:
    """A login token for the account, as the pool gets them."""
    answer = httpx.post(url, json={"username": username, "password": password}, trust_env=False)
    answer.raise_for_status()
    return str(answer.json()["data"]["token"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=WARMUP_SECONDS, help="Seconds, per run.")
    parser.add_argument("--duration", type=int, default=DURATION_SECONDS, help="Seconds, per run.")
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="Also run the proxy with OpenTelemetry tracing, sampled and unsampled.",
    )
    args = parser.parse_args()
    nginx = nginx_binary()
    if shutil.which("wrk") is None or nginx is None:
        raise SystemExit("wrk or nginx is missing: run `make bench-deps` (apt-get install)")
    has_proxy = proxy_available()
    started, load_before = time.monotonic(), os.getloadavg()[0]
    pin = can_pin(LOAD_CORE, PROXY_CORE)
    if pin:
        # This process (and the authorization server's threads) stay off the proxy's core.
        os.sched_setaffinity(0, {LOAD_CORE})
    processes: list[subprocess.Popen[bytes]] = []
    proxies = 0
    with (
        Sink() as sink,
        authorization_server() as idp,
        tempfile.TemporaryDirectory(prefix="bench-proxy-") as name,
        open(Path(name, "servers.log"), "wb") as log,
    ):
        tmp = Path(name)
        try:
            for i in range(ACCOUNTS):
                idp.add_account(f"u{i}", f"p{i}")
            idp.add_account("nginx", "nginx")
            nginx_token = login(idp.login_url, "nginx", "nginx")
            up_port, nginx_port = free_port(), free_port()
            (tmp / "upstream").mkdir()
            conf = nginx_conf(tmp / "upstream", upstream_http(up_port))
            upstream = start_nginx(nginx, conf, up_port, pinned(LOAD_CORE, pin), log)
            processes.append(upstream)
            (tmp / "nginx").mkdir()
            conf = nginx_conf(tmp / "nginx", reference_http(nginx_port, up_port, nginx_token))
            reference = start_nginx(nginx, conf, nginx_port, pinned(PROXY_CORE, pin), log)
            processes.append(reference)
            targets = [
                Target(DIRECT, f"http://127.0.0.1:{up_port}{BENCH_PATH}"),
                Target(NGINX, f"http://127.0.0.1:{nginx_port}{BENCH_PATH}", reference),
            ]
            check(targets[0], "none", lambda: [""])
            check(targets[1], "nginx's token", lambda: [nginx_token])
            if has_proxy:
                config = tmp / "tokenbroker.yaml"
                config.write_text(proxy_yaml(idp.login_url, idp.token_url, up_port))
                proxy = start_proxy(config, pin, log)
                processes.append(proxy.process)
                url, health = proxy.urls["proxy"], proxy.urls["health"]
                pool = Target(POOL, f"{url}/pool{BENCH_PATH}", proxy.process, health)
                shared = Target(SHARED, f"{url}/shared{BENCH_PATH}", proxy.process, health)
                # The first login token is nginx's; the proxy logs in after that.
                check(pool, "a login token", lambda: idp.issued_login_tokens[1:])
                check(shared, "an issued access token", lambda: idp.issued_access_tokens)
                total = pool_stats(health).get("total")
                if total != ACCOUNTS:
                    raise SystemExit(f"/health: pool total is {total}, not {ACCOUNTS}")
                targets += [pool, shared]
                proxies = 1
                for suffix, ratio in ((TRACED, 1.0), (UNSAMPLED, 0.0)) if args.tracing else ():
                    traced = tmp / f"tokenbroker-{ratio}.yaml"
                    telemetry = f"{{otlp_endpoint: '{sink.url}', sample_ratio: {ratio}}}"
                    traced.write_text(proxy_yaml(idp.login_url, idp.token_url, up_port, telemetry))
                    more = start_proxy(traced, pin, log)
                    processes.append(more.process)
                    proxies += 1
                    url, health = more.urls["proxy"], more.urls["health"]
                    pool = Target(POOL + suffix, f"{url}/pool{BENCH_PATH}", more.process, health)
                    shared = Target(SHARED + suffix, f"{url}/shared{BENCH_PATH}", more.process)
                    check(pool, "a login token", lambda: idp.issued_login_tokens[1:])
                    check(shared, "an issued access token", lambda: idp.issued_access_tokens)
                    targets += [pool, shared]
            results = [
                run(target, upstream, connections, (args.warmup, args.duration), pin)
                for connections in CONNECTIONS
                for target in targets
            ]
            counts = {grant: idp.count(grant) for grant in ("login", "client_credentials")}
        except BaseException:
            log.flush()
            sys.stderr.write(Path(tmp, "servers.log").read_text(errors="replace")[-4000:])
            raise
        finally:
            for process in reversed(processes):
                stop(process)
        exported = (sink.exports, sink.bytes)
    elapsed = time.monotonic() - started
    report(results, args, pin, nginx, counts, elapsed, load_before, proxies, exported)


def report(
    results: list[Result],
    args: argparse.Namespace,
    pin: bool,
    nginx: str,
    counts: dict[str, int],
    elapsed: float,
    load: float,
    proxies: int = 1,
    exported: tuple[int, int] = (0, 0),
) -> None:
    """Print the table, the goals and the summary line; exit 1 when the run is invalid."""
    by = {(r.label, r.connections): r for r in results}

    def ratio(r: Result, label: str) -> str:
        other = by.get((label, r.connections))
        if (r.label == DIRECT and label == NGINX) or other is None or not other.rps:
            return "-"
        return f"{r.rps / other.rps:.2f}"

    def optional(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    rows = [
        [
            r.label + (" !" if r.error else ""),
            *(str(r.connections), f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}"),
            *(ratio(r, DIRECT), ratio(r, NGINX), optional(r.cpu_us, 1, 1), optional(r.others, 100)),
        ]
        for r in results
    ]
    pinning = f"wrk and upstream on core {LOAD_CORE}, proxy on core {PROXY_CORE}"
    print(
        f"proxy: wrk -t1, {args.duration} s per run after a {args.warmup} s warm-up; "
        f"{pinning if pin else 'not pinned'}; {nginx_version(nginx)} with 1 worker; "
        f"CPython {platform.python_version()}, {os.cpu_count()} CPUs; tokenbroker {BUILD}"
    )
    print(render_table(HEADER, rows))
    print()
    reference = by.get((NGINX, GOAL_CONNECTIONS))
    ours = {label: by[label, GOAL_CONNECTIONS] for label in OURS if (label, GOAL_CONNECTIONS) in by}
    if not ours or reference is None:
        print("proxy: `tokenbroker proxy` is not available — goals not measured")
        raise SystemExit(1)
    wrong = [f"{r.label} at {r.connections} conns: {r.error}" for r in results if r.error]
    if counts["login"] != ACCOUNTS * proxies + 1 or counts["client_credentials"] != proxies:
        wrong.append(f"token requests after start-up ({counts})")
    if wrong:
        print(f"proxy: run INVALID — {'; '.join(wrong)}")
        raise SystemExit(1)

    rps = {label: r.rps / reference.rps for label, r in ours.items()}
    p99 = {label: r.p99_ms / reference.p99_ms for label, r in ours.items()}
    goals = [
        (f"{label} >= {GOAL_RATIO:g}x nginx req/s", rps[label], rps[label] >= GOAL_RATIO)
        for label in ours
    ] + [
        (f"{label} p99 <= {GOAL_P99_RATIO:g}x nginx's", p99[label], p99[label] <= GOAL_P99_RATIO)
        for label in ours
    ]
    print(f"goals (at {GOAL_CONNECTIONS} conns):")
    for text, value, met in goals:
        print(f"  {text:<44} {value:>5.2f}x  {'met' if met else 'NOT met'}")
    cpu = ", ".join(
        f"{label.removeprefix('tokenbroker ')} {r.cpu_us / reference.cpu_us:.1f}x"
        for label, r in ours.items()
        if r.cpu_us and reference.cpu_us
    )
    print(f"  (proxy CPU per request at {GOAL_CONNECTIONS} conns, against nginx's: {cpu}; no goal)")
    in_use = ", ".join(f"{r.in_use} at {r.connections}" for r in results if r.label == POOL)
    print(f"  pool leases in use half-way through the runs, at conns (of {ACCOUNTS}): {in_use}")
    print(
        f"  token requests: {counts['login']} logins ({ACCOUNTS} accounts per proxy and nginx's"
        f" token), {counts['client_credentials']} client_credentials, all before measuring"
    )
    tracing = tracing_cost(by)
    if tracing:
        print(f"  tracing: {tracing}; the sink got {exported[0]} exports, {exported[1]:,} bytes")
    print(
        f"  run took {elapsed:.0f} s; 1-minute load average before it {load:.1f} (others % shows "
        "how busy the machine was; cpu us/req is the figure that moves least)"
    )
    print()
    met = all(ok for _, _, ok in goals)
    parts = [
        f"{label.removeprefix('tokenbroker ')} {rps[label]:.2f}x"
        + (f" nginx req/s at {GOAL_CONNECTIONS} conns" if i == 0 else "")
        + f" (p99 {p99[label]:.1f}x)"
        for i, label in enumerate(ours)
    ]
    verdict = (
        f"goal >= {GOAL_RATIO:g}x and p99 <= {GOAL_P99_RATIO:g}x: {'met' if met else 'NOT met'}"
    )
    busy = max(r.others or 0.0 for r in [reference, *ours.values()])
    if busy > BUSY_SHARE:
        verdict += f" (machine busy: others took up to {busy:.0%} of the cores)"
    if tracing:
        verdict += f"; tracing: {tracing}"
    print(f"proxy: tokenbroker ({BUILD}) {', '.join(parts)}; {verdict}")


def tracing_cost(by: dict[tuple[str, int], Result]) -> str:
    """The shared route's tracing rows against its untraced one at the goal's connections:
    req/s ratio and added CPU per request; empty without ``--tracing`` rows."""
    plain = by.get((SHARED, GOAL_CONNECTIONS))
    parts = []
    for suffix, what in ((TRACED, "sampled"), (UNSAMPLED, "unsampled")):
        row = by.get((SHARED + suffix, GOAL_CONNECTIONS))
        if plain is None or row is None or not plain.rps:
            continue
        extra = ""
        if row.cpu_us is not None and plain.cpu_us is not None:
            extra = f", {row.cpu_us - plain.cpu_us:+.1f} us CPU/req"
        parts.append(f"{what} {row.rps / plain.rps:.2f}x req/s{extra}")
    return f"shared at {GOAL_CONNECTIONS} conns {', '.join(parts)}" if parts else ""


if __name__ == "__main__":
    main()
