"""A child process of ``crash_rotation.py``: the refresher that gets killed, or its restart.

``python _crash_child.py crash JOB.json``: build a broker on the job's store, fetch the
first token normally, print ``{"ready": <digest>}``, wait for ``go`` on stdin, then force
one refresh (invalidate the token, fetch again) with a hook that SIGKILLs this process at
the job's crash point. ``after_send`` arms a timer at ``before_send`` instead, so the kill
lands while the request is at the (slowed) provider. Surviving is a failure (exit 2).

``python _crash_child.py restart JOB.json``: fetch a token as a restarted process would; if
it is still the token the killed process was replacing (``stale`` digest), invalidate it
and fetch again. Prints ``{"outcome": "token"|"error", ...}``.

Only token digests are printed, never tokens. A watchdog ends either mode on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tokenbroker import Broker, parse_settings

PROVIDER = "rt"
WATCHDOG = 30.0


def digest(access_token: str) -> str:
    """A short, non-reversible name for an access token."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:16]


def report(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash(job: dict[str, Any]) -> int:
    point, armed = job["point"], threading.Event()

    def hook(name: str) -> None:
        if not armed.is_set():
            return
        if point == "after_send" and name == "before_send":
            threading.Timer(job["kill_delay"], die).start()
        elif name == point:
            die()

    broker = Broker(parse_settings(job["settings"], {}), hook=hook)
    token = broker.get_token(PROVIDER)
    report({"ready": digest(token.access_token)})
    if sys.stdin.readline().strip() != "go":
        return 3
    armed.set()
    broker.invalidate(PROVIDER, token.access_token)
    try:
        broker.get_token(PROVIDER)
        outcome = "token"
    except Exception as exc:
        outcome = type(exc).__name__
    if point == "after_send":  # the timer may still be about to fire
        threading.Event().wait(job["kill_delay"] + 2.0)
    report({"survived": outcome})
    return 2


def restart(job: dict[str, Any]) -> int:
    broker = Broker(parse_settings(job["settings"], {}))
    refreshed = False
    try:
        token = broker.get_token(PROVIDER)
        if digest(token.access_token) == job["stale"]:
            refreshed = True
            broker.invalidate(PROVIDER, token.access_token)
            token = broker.get_token(PROVIDER)
    except Exception as exc:
        report({"outcome": "error", "error": type(exc).__name__, "refreshed": refreshed})
    else:
        report({"outcome": "token", "token": digest(token.access_token), "refreshed": refreshed})
    finally:
        broker.close()
    return 0


def main(mode: str, job_path: str) -> int:
    watchdog = threading.Timer(WATCHDOG, os._exit, args=(4,))
    watchdog.daemon = True
    watchdog.start()
    job = json.loads(Path(job_path).read_text())
    return crash(job) if mode == "crash" else restart(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
