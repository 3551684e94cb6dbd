"""SSE: concurrent job streams on one uvicorn worker, tokenbroker's against bare sse-starlette.

What is measured. Two servers (``_sse_server.py``), each one uvicorn worker in its own
process on 127.0.0.1, started fresh for every run, each with ``--jobs`` event channels
publishing one event a second each (channel j at j/jobs of every second) and streams
spread evenly over the channels: ``bare`` (an sse-starlette ``EventSourceResponse`` over
a generator awaiting the channel's next publication; the library's ping every 5 s) and
``ours`` (the job stream path: queued jobs in a ``JobService`` on the memory store, each
publication appended to the job in the store and notified, each stream
:func:`tokenbroker.api.sse.event_stream` over a ``JobEventSource``: one feed per job,
Last-Event-ID, heartbeats every 5 s, lifetime deadline, stream gauge).

For 1,000 and then 5,000 streams, each server: ``--clients`` client processes (raw
asyncio sockets on uvloop; not httpx, so the load generator is not the bottleneck) open
their share of the streams, at most ``OPENING`` connections being opened at once per
process (a ramp at the server's own pace, never past the listen backlog), wait for every
response head, start the publishing (so no stream opens with a backlog to replay), let
them run ``--warmup`` seconds, then record ``--duration`` seconds.
``held`` counts streams that got at least ``duration - 1`` events in the window (open
and flowing at the publishing rate); ``events/s`` is the events delivered per second over
all streams (= the stream count when every stream keeps up); ``cpu %`` is the server
process's own user+system CPU time in the window over the window's length (100 = one
core; the clients' CPU is not counted); ``KB/stream`` is the server's RSS growth from
before the streams opened, per open stream; ``p50/p99 ms`` is the delay from publishing
(the event's ``ts``) to arrival at a client. ``streams/core`` is events/s / (cpu % /
100): how many 1-event-a-second streams one core serves at this cost per event (equal to
held / CPU when every stream keeps up, and still a fair cost when a busy machine leaves
the server short of CPU and events arrive late); ``x bare`` divides ours by bare's at the
same stream count: "streams at the same CPU". After the window the clients
close every stream; for ``ours`` the run fails unless the server's gauge reads 0 open
streams, 0 stream subscriptions, 0 feeds and 0 hub subscriptions within 10 s.

A server short of CPU delivers late rather than dropping events, so ``held`` falls and
the latency grows; that is reported as measured (bare's too), and only ours' ``held`` is
a goal. Nothing is pinned unless ``--pin`` (server on core 1, clients on core 0): on a shared
machine pinning puts the server behind whatever else runs on its core. Goals: ``x bare``
>= 0.8 at 1,000 and 5,000 streams, p99 <= 50 ms at 1,000. The last line is the one-line
summary; the exit status is non-zero only when a run itself is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import uvloop

from _common import can_pin, free_port, pinned, render_table

STREAMS = (1000, 5000)
GOAL_RATIO = 0.8
GOAL_P99_MS = 50.0
GOAL_STREAMS = 1000
OPENING = 100
OPEN_SECONDS = 300
SERVER = Path(__file__).with_name("_sse_server.py")
CLIENT_CORE, SERVER_CORE = 0, 1
TS = re.compile(rb'"ts": ?([0-9.]+)')


@dataclass
class Result:
    label: str
    streams: int
    held: int
    events_per_s: float
    cpu_pct: float
    kb_per_stream: float
    p50_ms: float
    p99_ms: float

    @property
    def per_core(self) -> float:
        return self.events_per_s / max(self.cpu_pct / 100, 1e-6)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Board:
    """One client process's streams: whether it records, and what it recorded."""

    def __init__(self) -> None:
        self.recording = False
        self.latencies: list[float] = []


async def follow(
    port: int,
    path: str,
    board: Board,
    counts: list[int],
    i: int,
    opening: asyncio.Semaphore,
    opened: list[asyncio.StreamWriter],
) -> None:
    """One raw SSE connection: counts events and, while recording, their latency."""
    async with opening:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
    # uvicorn sends the head with the first body bytes: the first heartbeat or ping (5 s)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream refused: {head[:40]!r}")
    opened.append(writer)
    while chunk := await reader.read(65536):
        found = TS.findall(chunk)
        if found and board.recording:
            now = time.time()
            counts[i] += len(found)
            board.latencies.extend(now - float(ts) for ts in found)


async def client(port: int, paths: list[str], pipe: Connection) -> None:
    """A client process: open ``paths``, report, record on command, report the counts."""
    loop = asyncio.get_running_loop()
    board, counts = Board(), [0] * len(paths)
    opening, opened = asyncio.Semaphore(OPENING), []
    tasks = [
        asyncio.create_task(follow(port, p, board, counts, i, opening, opened))
        for i, p in enumerate(paths)
    ]
    started = loop.time()
    deadline = started + OPEN_SECONDS
    while len(opened) < len(paths) and loop.time() < deadline:
        if failed := [t for t in tasks if t.done()]:
            raise RuntimeError(f"a stream failed to open: {failed[0].exception()!r}")
        await asyncio.sleep(0.05)
    took = loop.time() - started
    print(f"  client {os.getpid()}: {len(opened)} streams open in {took:.1f} s", file=sys.stderr)
    pipe.send(len(opened))
    await loop.run_in_executor(None, pipe.recv)  # "record"
    board.recording = True
    cpu0 = time.process_time()
    await loop.run_in_executor(None, pipe.recv)  # "stop"
    board.recording = False
    cpu = time.process_time() - cpu0
    ended = sum(1 for t in tasks if t.done())
    pipe.send((counts, board.latencies, ended, cpu))
    for task in tasks:
        task.cancel()
    for writer in opened:
        writer.close()
    await asyncio.gather(*tasks, return_exceptions=True)


def client_process(port: int, paths: list[str], pipe: Connection, core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    uvloop.run(client(port, paths, pipe))


def load(
    port: int,
    pid: int,
    count: int,
    jobs: int,
    clients: int,
    warmup: float,
    duration: float,
    pin: bool,
) -> Result:
    paths = [f"/stream/{i % jobs}" for i in range(count)]
    base_rss = rss_kb(pid)
    context = multiprocessing.get_context("fork")
    pipes, processes = [], []
    for c in range(clients):
        ours, theirs = context.Pipe()
        process = context.Process(
            target=client_process,
            args=(port, paths[c::clients], theirs, CLIENT_CORE if pin else None),
        )
        process.start()
        pipes.append(ours)
        processes.append(process)
    try:
        opened = 0
        for pipe in pipes:
            if not pipe.poll(OPEN_SECONDS + 30):
                raise SystemExit("the clients did not open their streams in time")
            opened += pipe.recv()
        if opened != count:
            raise SystemExit(f"only {opened} of {count} streams opened")
        httpx.post(f"http://127.0.0.1:{port}/start", timeout=10)
        time.sleep(warmup)
        for pipe in pipes:
            pipe.send("record")
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(duration)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        for pipe in pipes:
            pipe.send("stop")
        rss = rss_kb(pid)
        counts: list[int] = []
        latencies: list[float] = []
        ended, client_cpu = 0, 0.0
        for pipe in pipes:
            got_counts, got_latencies, got_ended, got_cpu = pipe.recv()
            counts += got_counts
            latencies += got_latencies
            ended += got_ended
            client_cpu += got_cpu
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    if ended:
        print(f"  {ended} streams ended early", file=sys.stderr)
    held = sum(1 for n in counts if n >= duration - 1)
    counts.sort()
    print(
        f"  {count} streams: events per stream in the window min {counts[0]}, "
        f"median {counts[len(counts) // 2]}, max {counts[-1]}; the {clients} clients used "
        f"{100 * client_cpu / (t1 - t0):.0f}% of a core",
        file=sys.stderr,
    )
    lat = sorted(latencies) or [0.0]
    return Result(
        label="",
        streams=count,
        held=held,
        events_per_s=sum(counts) / duration,
        cpu_pct=100 * (cpu1 - cpu0) / (t1 - t0),
        kb_per_stream=(rss - base_rss) / count,
        p50_ms=1000 * statistics.median(lat),
        p99_ms=1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    )


def start(mode: str, jobs: int, pin: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    server = [sys.executable, str(SERVER), mode, str(port), str(jobs)]
    command = [*pinned(SERVER_CORE, pin), *server]
    process = subprocess.Popen(command, cwd=SERVER.parent)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/gauge", timeout=1)
            return process, port
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit(f"the {mode} server did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def drained(port: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = httpx.get(f"http://127.0.0.1:{port}/gauge", timeout=2).json()
        if not any(counts.values()):  # streams, subscriptions, feeds, hub subscriptions
            return True
        time.sleep(0.1)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--jobs", type=int, default=10, help="event channels (jobs)")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--pin", action="store_true", help="server on core 1, clients on 0")
    parser.add_argument("--streams", type=int, nargs="+", default=list(STREAMS))
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the clients inherit it
    if hard < max(args.streams) + 100:
        raise SystemExit(f"need {max(args.streams) + 100} descriptors, the hard limit is {hard}")
    pin = args.pin and can_pin(CLIENT_CORE, SERVER_CORE)
    started = time.monotonic()
    results: list[Result] = []
    for count in args.streams:
        for mode in ("bare", "ours"):
            process, port = start(mode, args.jobs, pin)
            try:
                result = load(
                    port,
                    process.pid,
                    count,
                    args.jobs,
                    args.clients,
                    args.warmup,
                    args.duration,
                    pin,
                )
                if mode == "ours" and not drained(port):
                    raise SystemExit("streams still open 10 s after every client left")
            finally:
                stop(process)
            result.label = mode
            results.append(result)
    report(results, args, pin, time.monotonic() - started)


def report(results: list[Result], args: argparse.Namespace, pin: bool, elapsed: float) -> None:
    bare = {r.streams: r for r in results if r.label == "bare"}
    rows = [
        [
            r.label,
            str(r.streams),
            str(r.held),
            f"{r.events_per_s:.0f}",
            f"{r.cpu_pct:.1f}",
            f"{r.kb_per_stream:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.per_core:.0f}",
            f"{r.per_core / bare[r.streams].per_core:.2f}x",
        ]
        for r in results
    ]
    pinning = "server on core 1, clients on core 0" if pin else "not pinned"
    print(
        f"sse: 1 event/s per stream over {args.jobs} jobs, {args.duration:g} s window, "
        f"1 uvicorn worker, {args.clients} client processes ({pinning}; "
        f"CPython {platform.python_version()}, {os.cpu_count()} CPUs)"
    )
    header = ["server", "streams", "held", "events/s", "cpu %", "KB/stream", "p50 ms", "p99 ms"]
    print(render_table([*header, "streams/core", "x bare"], rows))
    print()
    ours = {r.streams: r for r in results if r.label == "ours"}
    counts = sorted(ours)
    ratio = {n: ours[n].per_core / bare[n].per_core for n in counts}
    at = GOAL_STREAMS if GOAL_STREAMS in ours else counts[0]
    p99 = ours[at].p99_ms
    all_held = all(r.held == r.streams for r in ours.values())
    goals = [
        *(
            (
                f"ours >= {GOAL_RATIO:g}x bare streams/core at {n}",
                f"{ratio[n]:.2f}x",
                ratio[n] >= GOAL_RATIO,
            )
            for n in counts
        ),
        (f"ours p99 <= {GOAL_P99_MS:g} ms at {at}", f"{p99:.1f} ms", p99 <= GOAL_P99_MS),
        ("ours: every stream held and flowing", "yes" if all_held else "no", all_held),
    ]
    print("goals:")
    for text, value, met in goals:
        print(f"  {text:<44} {value:>8}  {'met' if met else 'NOT met'}")
    print("  ours: every stream, subscription and feed freed within 10 s of the clients leaving")
    print(f"  run took {elapsed:.0f} s")
    print()
    met = all(ok for _, _, ok in goals)
    top = ours[counts[-1]]
    ratios = ", ".join(f"{ratio[n]:.2f}x at {n}" for n in counts)
    print(
        f"SUMMARY sse: ours {ratios} bare streams/core; at {top.streams}: {top.held} held, "
        f"{top.cpu_pct:.0f}% of a core, {top.kb_per_stream:.0f} KB/stream; p99 {p99:.1f} ms "
        f"at {at} — goals {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
