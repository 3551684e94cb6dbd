"""SSE: concurrent streams on one uvicorn worker, ``api/sse.py`` against bare sse-starlette.

What is measured. Two servers (``_sse_server.py``), each one uvicorn worker in its own
process on 127.0.0.1, started fresh for every run: ``bare`` (an sse-starlette
``EventSourceResponse`` over a generator that sleeps 1 s and yields a timestamped event)
and ``ours`` (:func:`tokenbroker.api.sse.event_stream` over a per-stream source whose
subscription yields the same event every second: subscription taken and freed per
stream, Last-Event-ID parsing, heartbeat factory, lifetime deadline, stream gauge). Both
send 1 event/s per stream and a ping every 5 s.

For 1,000 and then 5,000 streams, each server: this process opens the streams with raw
asyncio sockets on uvloop (not httpx: the client must not be the bottleneck), waits for
every response head, lets them run ``--warmup`` seconds, then measures ``--duration``
seconds. ``held`` counts streams that got at least ``duration - 1`` events in the window
(open and flowing); ``cpu %`` is the server process's user+system CPU time in the window
over the window's length (100 = one core); ``KB/stream`` is the server's RSS growth from
before the streams opened, per held stream; ``p50/p99 ms`` is the delay from the
event's ``ts`` (set in the server just before framing) to its arrival here. ``streams/core``
is held / (cpu % / 100), and ``x bare`` divides ours by bare's at the same stream count:
that is "streams at the same CPU". After the window the client closes every stream; for
``ours`` the run fails unless the server's gauge reads 0 open streams within 10 s.

The server is pinned to core 1 and this process to core 0 when ``taskset`` allows. Goals:
``x bare`` >= 0.8 at 1,000 and 5,000 streams, p99 <= 50 ms at 1,000. The last line is the
one-line summary; the exit status is non-zero only when a run itself is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvloop

from _common import can_pin, free_port, pinned, render_table

STREAMS = (1000, 5000)
GOAL_RATIO = 0.8
GOAL_P99_MS = 50.0
GOAL_STREAMS = 1000
SERVER = Path(__file__).with_name("_sse_server.py")
CLIENT_CORE, SERVER_CORE = 0, 1
REQUEST = b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
TS = re.compile(rb'"ts": ?([0-9.]+)')


@dataclass
class Result:
    label: str
    streams: int
    held: int
    cpu_pct: float
    kb_per_stream: float
    p50_ms: float
    p99_ms: float

    @property
    def per_core(self) -> float:
        return self.held / max(self.cpu_pct / 100, 1e-6)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Stream:
    """One raw SSE connection: counts events and, while ``recording``, their latency."""

    def __init__(self) -> None:
        self.events = 0
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, port: int, ready: asyncio.Event, board: Board) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer = writer
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream refused: {head[:40]!r}")
        board.opened += 1
        if board.opened == board.wanted:
            ready.set()
        while chunk := await reader.read(65536):
            found = TS.findall(chunk)
            if found and board.recording:
                now = time.time()
                self.events += len(found)
                board.latencies.extend(now - float(ts) for ts in found)


class Board:
    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.opened = 0
        self.recording = False
        self.latencies: list[float] = []


async def load(port: int, pid: int, count: int, warmup: float, duration: float) -> Result:
    board = Board(count)
    ready = asyncio.Event()
    base_rss = rss_kb(pid)
    streams = [Stream() for _ in range(count)]
    tasks: list[asyncio.Task[None]] = []
    for i, stream in enumerate(streams):
        tasks.append(asyncio.create_task(stream.run(port, ready, board)))
        if i % 100 == 99:
            await asyncio.sleep(0.02)  # let the server accept in batches (listen backlog)
    await asyncio.wait_for(ready.wait(), 60)
    await asyncio.sleep(warmup)
    board.recording = True
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(duration)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    board.recording = False
    rss = rss_kb(pid)
    failed = [t for t in tasks if t.done()]
    for task in tasks:
        task.cancel()
    for stream in streams:
        if stream.writer is not None:
            stream.writer.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    if failed:
        print(f"  {len(failed)} streams ended early", file=sys.stderr)
    held = sum(1 for s in streams if s.events >= duration - 1)
    counts = sorted(s.events for s in streams)
    print(
        f"  {count} streams: events per stream in the window min {counts[0]}, "
        f"median {counts[len(counts) // 2]}, max {counts[-1]}",
        file=sys.stderr,
    )
    lat = sorted(board.latencies) or [0.0]
    return Result(
        label="",
        streams=count,
        held=held,
        cpu_pct=100 * (cpu1 - cpu0) / (t1 - t0),
        kb_per_stream=(rss - base_rss) / max(held, 1),
        p50_ms=1000 * statistics.median(lat),
        p99_ms=1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    )


def start(mode: str, pin: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [*pinned(SERVER_CORE, pin), sys.executable, str(SERVER), mode, str(port)]
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
        if httpx.get(f"http://127.0.0.1:{port}/gauge", timeout=2).json()["open"] == 0:
            return True
        time.sleep(0.1)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < max(STREAMS) + 100:
        raise SystemExit(f"need {max(STREAMS) + 100} descriptors, the hard limit is {hard}")
    pin = can_pin(CLIENT_CORE, SERVER_CORE)
    if pin:
        os.sched_setaffinity(0, {CLIENT_CORE})
    started = time.monotonic()
    results: list[Result] = []
    for count in STREAMS:
        for mode in ("bare", "ours"):
            process, port = start(mode, pin)
            try:
                result = uvloop.run(load(port, process.pid, count, args.warmup, args.duration))
                if mode == "ours" and not drained(port):
                    raise SystemExit("streams still open 10 s after every client left")
            finally:
                stop(process)
            result.label = mode
            results.append(result)
    report(results, args.duration, pin, time.monotonic() - started)


def report(results: list[Result], duration: float, pin: bool, elapsed: float) -> None:
    bare = {r.streams: r for r in results if r.label == "bare"}
    rows = [
        [
            r.label,
            str(r.streams),
            str(r.held),
            f"{r.cpu_pct:.1f}",
            f"{r.kb_per_stream:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.per_core:.0f}",
            f"{r.per_core / bare[r.streams].per_core:.2f}x",
        ]
        for r in results
    ]
    pinning = "server on core 1, client on core 0" if pin else "not pinned"
    print(
        f"sse: 1 event/s per stream, {duration:g} s window, 1 uvicorn worker ({pinning}; "
        f"CPython {platform.python_version()}, {os.cpu_count()} CPUs)"
    )
    header = ["server", "streams", "held", "cpu %", "KB/stream", "p50 ms", "p99 ms"]
    print(render_table([*header, "streams/core", "x bare"], rows))
    print()
    ours = {r.streams: r for r in results if r.label == "ours"}
    ratio = {n: ours[n].per_core / bare[n].per_core for n in STREAMS}
    p99 = ours[GOAL_STREAMS].p99_ms
    all_held = all(r.held == r.streams for r in results)
    goals = [
        *(
            (
                f"ours >= {GOAL_RATIO:g}x bare streams/core at {n}",
                f"{ratio[n]:.2f}x",
                ratio[n] >= GOAL_RATIO,
            )
            for n in STREAMS
        ),
        (f"ours p99 <= {GOAL_P99_MS:g} ms at {GOAL_STREAMS}", f"{p99:.1f} ms", p99 <= GOAL_P99_MS),
        ("every stream held and flowing", "yes" if all_held else "no", all_held),
    ]
    print("goals:")
    for text, value, met in goals:
        print(f"  {text:<44} {value:>8}  {'met' if met else 'NOT met'}")
    print("  ours: every stream freed (gauge 0) within 10 s of the clients leaving")
    print(f"  run took {elapsed:.0f} s")
    print()
    met = all(ok for _, _, ok in goals)
    print(
        f"sse: ours {ratio[1000]:.2f}x bare streams/core at 1000, {ratio[5000]:.2f}x at 5000 "
        f"({ours[5000].cpu_pct:.0f}% of a core, {ours[5000].kb_per_stream:.0f} KB/stream), "
        f"p99 {p99:.1f} ms at 1000 — goals {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
