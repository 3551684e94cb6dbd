"""One OS process of ``test_processes.py``: many threads calling ``get_token`` on a shared store.

Run as ``python process_worker.py JOB.json``. The job file names the settings (YAML text),
the provider, a wall-clock ``start_at`` every worker waits for, how long at most to keep
calling (``duration``; 0 means one call per thread), a ``stop_file`` whose appearance ends
the calls earlier, the thread count and the pause between calls.

Prints one JSON line: calls made, errors by class, and the SHA-256 prefixes of the distinct
access tokens seen (never the tokens). Exits 0 only when no call failed. A watchdog ends the
process on its own if the threads do not finish in time, so it never outlives the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from tokenbroker import Broker, parse_settings

WATCHDOG_SLACK = 20.0


def digest(access_token: str) -> str:
    """A short, non-reversible name for an access token (what workers report)."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:16]


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    duration = float(job["duration"])
    watchdog = threading.Timer(
        max(job["start_at"] - time.time(), 0) + duration + WATCHDOG_SLACK, os._exit, args=(3,)
    )
    watchdog.daemon = True
    watchdog.start()

    broker = Broker(parse_settings(job["settings"], {}))
    provider, pause = job["provider"], float(job["pause"])
    lock = threading.Lock()
    seen: set[str] = set()
    errors: Counter[str] = Counter()
    calls = [0]

    def call() -> None:
        try:
            token = broker.get_token(provider)
        except Exception as exc:
            with lock:
                errors[type(exc).__name__] += 1
                calls[0] += 1
            return
        name = digest(token.access_token)
        with lock:
            seen.add(name)
            calls[0] += 1

    stop = job["start_at"] + duration
    stopped = threading.Event()

    def watch() -> None:
        stop_file = Path(job["stop_file"])
        while not stopped.wait(0.02):
            if time.time() >= stop or stop_file.exists():
                stopped.set()

    def loop() -> None:
        time.sleep(max(job["start_at"] - time.time(), 0))
        call()
        while not stopped.is_set():
            time.sleep(pause)
            call()

    if duration <= 0:
        stopped.set()
    threading.Thread(target=watch, daemon=True).start()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(job["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    broker.close()
    print(json.dumps({"calls": calls[0], "errors": dict(errors), "tokens": sorted(seen)}))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
