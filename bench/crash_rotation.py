"""Crash rotation: SIGKILL the refreshing process at each crash point, restart, audit the result.

What is measured. For each provider policy — ``grace`` (single-use refresh tokens, a reused
one is honoured for 24 h, like Tesla) and ``strict`` (single use; a reuse revokes the whole
token family, RFC 9700 §4.14.2) — and each crash point of the refresh protocol
(``reference/refresh-protocol.md``):

* ``before_send``: intent recorded, request not sent (window W2);
* ``after_send``: request at the provider, reply not yet back (W3: the provider rotates,
  the new refresh token is lost with the process);
* ``after_reply``: reply in memory, not committed (W3 as well: nothing was persisted);
* ``after_commit``: new tokens committed, lease not yet released (W5);

every trial uses a fresh local ``tokenbroker.testing`` authorization server (127.0.0.1)
and a fresh SQLite store file, and runs three steps:

1. a child process (``_crash_child.py crash``) fetches the first token normally, then
   forces one refresh with a hook that SIGKILLs it at the crash point (``after_send``: a
   timer fires 0.2 s after ``before_send`` while the provider holds the request for 1 s;
   the parent waits until the provider has processed it before going on);
2. a second child (``restart``) starts after the killed one is reaped and gets a token
   the way a restarted process would (refreshing if the stored token is the one the killed
   process was replacing). It takes over the dead holder's lease at once;
3. the parent audits: the provider's request log, the store's row and attempt records,
   and — in-process, on the same store — whether the stored refresh token still works
   (a forced refresh succeeds) or the credential is reported dead (``get_token`` raises
   ``ReauthorizationRequiredError`` without a request).

How to read the output. One table per policy, one row per crash point: ``recovered``
trials ended with a working credential; ``reauth required`` trials lost the credential
and report it (the restart and every later call raise ``ReauthorizationRequiredError``);
``lost unreported`` (must be 0) is everything else; ``reached IdP`` counts trials whose
killed request did arrive at the provider; ``max req after crash`` is the most token
requests any restart sent (plus, for dead credentials, any sent later); ``double
successors`` (must be 0) counts refresh-token versions with two successors stored;
``revoked AT served`` counts dead credentials for which a fresh process's plain
``get_token`` still handed out the stored access token although the provider had revoked
it with its family (it answers 401 upstream; informational, not part of the verdict).

The last three columns come from the authorization server's own record
(``GET /testing/refresh-tokens``: each refresh token by fingerprint, how often it arrived,
and what each presentation did), not from tokenbroker's: refresh tokens the server saw more
than once, split into ``RT 2x in grace`` (every repeat honoured inside the provider's reuse
grace: by design, the in-doubt recovery of step 7), ``RT 2x probe`` (a provider without a
grace: the in-doubt token presented exactly once more, rejected, and the credential reported
``reauthorization_required``: by design, step 7) and ``RT 2x outside`` (anything else: a
violation; must be 0).

The last line is the summary against the requirements, from the server's record first:
0 refresh tokens presented twice outside the reuse grace (beyond the one no-grace probe);
then 0 double successors; grace: 0 lost; strict: every loss reported, at most 2 requests
after the crash.

Every child has a watchdog and a parent-side timeout; trials run two at a time; the run
has an overall budget (``--budget``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from _common import render_table
from tokenbroker import Broker, ReauthorizationRequiredError, parse_settings
from tokenbroker.core.crypto import generate_key
from tokenbroker.testing import AuthorizationServer, Fault
from tokenbroker.testing.authserver import REFRESH_REPORT_PATH

CHILD = Path(__file__).with_name("_crash_child.py")
PROVIDER = "rt"
CLIENT_ID = "rt-client"
POINTS = ("before_send", "after_send", "after_reply", "after_commit")
SENT_POINTS = frozenset(POINTS[1:])
GRACE = 86400.0
SEND_DELAY = 1.0  # how long the provider holds the after_send request
KILL_DELAY = 0.2  # when the after_send timer kills the child, after before_send
CHILD_TIMEOUT = 30.0
MAX_REQUESTS_AFTER_CRASH = 2


@dataclass(frozen=True)
class Policy:
    """A provider rotation policy and the matching provider settings."""

    name: str
    rotation: str
    grace: float


POLICIES = (Policy("grace", "grace", GRACE), Policy("strict", "strict", 0.0))


@dataclass
class Trial:
    """What one kill-and-restart showed."""

    policy: str
    point: str
    killed: bool = False
    reached: bool = False
    outcome: str = "lost"  # recovered | reauth | lost
    requests_after: int = 0
    double_successors: int = 0
    revoked_served: bool = False
    # From the authorization server's own record: refresh tokens it saw more than once.
    twice_in_grace: int = 0
    twice_probe: int = 0
    twice_violation: int = 0
    notes: list[str] = field(default_factory=list)


def settings_yaml(server: AuthorizationServer, seed: str, db: Path, key: str, grace: float) -> str:
    """One single-use refresh-token credential on a store file, for ``policy``."""
    return yaml.safe_dump(
        {
            "store": f"sqlite:///{db}",
            "encryption_keys": [key],
            "defaults": {
                "retries": 2,
                "backoff_seconds": 0.01,
                "deadline_seconds": 3,
                "lease_seconds": 8,
            },
            "providers": {
                PROVIDER: {
                    "grant": "refresh_token",
                    "token_url": server.token_url,
                    "client_id": CLIENT_ID,
                    "refresh_token": seed,
                    "rotation": {"single_use": True, "reuse_grace_seconds": grace},
                }
            },
        }
    )


def spawn(mode: str, job: Path) -> subprocess.Popen[str]:
    """Start a child; its stderr goes to a file next to the job (never a full pipe)."""
    with (job.parent / f"{mode}.stderr").open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, str(CHILD), mode, str(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def stderr_tail(job: Path, mode: str) -> str:
    return (job.parent / f"{mode}.stderr").read_text()[-500:].strip()


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill (by its PID) a child we started if it still runs, and wait for it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def run_trial(policy: Policy, point: str) -> Trial:
    """Kill a refresh at ``point``, restart, and audit the provider's and the store's records."""
    trial = Trial(policy.name, point)
    server = AuthorizationServer(
        expires_in=3600, rotation=policy.rotation, reuse_grace_seconds=policy.grace
    )
    server.add_client(CLIENT_ID, None, auth_method="none")
    with server, tempfile.TemporaryDirectory(prefix="crash-rotation-") as tmp:
        try:
            kill_and_restart(trial, policy, point, server, Path(tmp))
        finally:
            count_repeats(trial, policy, server)
    return trial


def kill_and_restart(
    trial: Trial, policy: Policy, point: str, server: AuthorizationServer, tmp: Path
) -> None:
    """Steps 1-3 of a trial (see the module docstring); problems go to ``trial.notes``."""
    seed = server.issue_refresh_token(CLIENT_ID)
    settings = settings_yaml(server, seed, tmp / "tb.db", generate_key(), policy.grace)
    job = tmp / "job.json"
    job.write_text(json.dumps({"settings": settings, "point": point, "kill_delay": KILL_DELAY}))

    child = spawn("crash", job)
    watchdog = threading.Timer(CHILD_TIMEOUT, child.kill)
    watchdog.start()
    try:
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline()
        if not line:
            child.wait(timeout=CHILD_TIMEOUT)
            trial.notes.append(f"crash child failed to start: {stderr_tail(job, 'crash')}")
            return
        stale = json.loads(line)["ready"]
        requests, issued = server.count("refresh_token"), len(server.issued_access_tokens)
        if point == "after_send":
            server.inject(Fault(delay=SEND_DELAY))
        child.stdin.write("go\n")
        child.stdin.flush()
        child.wait(timeout=CHILD_TIMEOUT)
        trial.killed = child.returncode == -signal.SIGKILL
        if not trial.killed:
            out = child.stdout.read()
            trial.notes.append(f"crash child exited {child.returncode}: {out.strip()}")
            return
    finally:
        watchdog.cancel()
        reap(child)

    trial.reached = server.count("refresh_token") > requests
    if trial.reached != (point in SENT_POINTS):
        trial.notes.append(f"kill at {point}: request reached the provider={trial.reached}")
    if trial.reached and not wait_for(
        lambda: len(server.issued_access_tokens) > issued, SEND_DELAY + 5.0
    ):
        trial.notes.append("the provider never processed the killed request")
    at_crash = server.count("refresh_token")

    job.write_text(json.dumps({"settings": settings, "stale": stale}))
    restarted = spawn("restart", job)
    try:
        out, _ = restarted.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        trial.notes.append("restart timed out")
        return
    finally:
        reap(restarted)
    if restarted.returncode != 0 or not out.strip():
        trial.notes.append(f"restart exited {restarted.returncode}: {stderr_tail(job, 'restart')}")
        return
    result = json.loads(out.strip().splitlines()[-1])
    trial.requests_after = server.count("refresh_token") - at_crash
    audit(trial, server, settings, result)


def count_repeats(trial: Trial, policy: Policy, server: AuthorizationServer) -> None:
    """Ask the authorization server which refresh tokens it saw more than once, and classify them.

    * in grace (by design): every repeat was honoured inside the provider's reuse grace;
    * no-grace probe (by design, refresh protocol step 7): on a provider without a grace, the
      in-doubt token was presented exactly once more, the provider rejected it, and the
      credential ended ``reauthorization_required`` — never a third time;
    * violation: anything else.
    """
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        reply = http.get(server.url + REFRESH_REPORT_PATH)
    reply.raise_for_status()
    for use in reply.json()["refresh_tokens"]:
        outcomes = use["outcomes"]
        if use["presented"] < 2:
            continue
        processed = len(outcomes) == use["presented"] and outcomes[:1] == ["accepted"]
        if processed and all(o == "accepted_in_grace" for o in outcomes[1:]):
            trial.twice_in_grace += 1
        elif (
            processed
            and policy.grace == 0
            and outcomes == ["accepted", "reused"]
            and trial.outcome == "reauth"
        ):
            trial.twice_probe += 1
        else:
            trial.twice_violation += 1
            trial.notes.append(f"refresh token presented {use['presented']}x: {outcomes}")


def audit(trial: Trial, server: AuthorizationServer, settings: str, result: dict[str, Any]) -> None:
    """Classify the trial from the restart's result, the store and one more probe."""
    with Broker(parse_settings(settings, {})) as broker:
        succeeded = Counter(
            a.from_version for a in broker.store.attempts(PROVIDER) if a.status == "succeeded"
        )
        trial.double_successors = sum(1 for n in succeeded.values() if n > 1)
        row = broker.store.load(PROVIDER)
        state = row.state if row is not None else "missing"
        before_probe = server.count("refresh_token")
        served, probe = probe_refresh(broker)
        probe_requests = server.count("refresh_token") - before_probe

    if result["outcome"] == "token" and probe == "token" and state == "active":
        trial.outcome = "recovered"
    elif (
        result.get("error") == "ReauthorizationRequiredError"
        and probe == "ReauthorizationRequiredError"
        and state == "reauthorization_required"
    ):
        trial.outcome = "reauth"
        # A dead credential must stay quiet: later calls do not go back to the provider.
        trial.requests_after += probe_requests
        trial.revoked_served = served is not None and not accepted(server, served)
    else:
        trial.notes.append(f"restart={result} state={state} probe={probe}")


def probe_refresh(broker: Broker) -> tuple[str | None, str]:
    """Get the stored token, then force one refresh on the stored refresh token.

    Returns:
        The access token a plain ``get_token`` served (None if it raised), and ``token``
        if the forced refresh worked, else the error's class name.
    """
    served = None
    try:
        served = broker.get_token(PROVIDER).access_token
        broker.invalidate(PROVIDER, served)
        broker.get_token(PROVIDER)
    except ReauthorizationRequiredError:
        return served, "ReauthorizationRequiredError"
    except Exception as exc:
        return served, type(exc).__name__
    return served, "token"


def accepted(server: AuthorizationServer, access_token: str) -> bool:
    """Whether the provider's protected resource accepts ``access_token``."""
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        reply = http.get(server.resource_url, headers={"Authorization": f"Bearer {access_token}"})
    return reply.status_code == 200


def cell_rows(trials: list[Trial], policy: str) -> list[list[str]]:
    rows = []
    for point in POINTS:
        cell = [t for t in trials if t.policy == policy and t.point == point]
        rows.append(
            [
                point,
                str(len(cell)),
                str(sum(t.killed for t in cell)),
                str(sum(t.reached for t in cell)),
                str(sum(t.outcome == "recovered" for t in cell)),
                str(sum(t.outcome == "reauth" for t in cell)),
                str(sum(t.outcome == "lost" for t in cell)),
                str(max((t.requests_after for t in cell), default=0)),
                str(sum(t.double_successors for t in cell)),
                str(sum(t.revoked_served for t in cell)),
                str(sum(t.twice_in_grace for t in cell)),
                str(sum(t.twice_probe for t in cell)),
                str(sum(t.twice_violation for t in cell)),
            ]
        )
    return rows


HEADER = (
    "crash point",
    "trials",
    "killed",
    "reached IdP",
    "recovered",
    "reauth required",
    "lost unreported",
    "max req after crash",
    "double successors",
    "revoked AT served",
    "RT 2x in grace",
    "RT 2x probe",
    "RT 2x outside",
)


def summarize(trials: list[Trial], expected: int) -> tuple[str, bool]:
    kills = sum(t.killed for t in trials)
    doubles = sum(t.double_successors for t in trials)
    grace = [t for t in trials if t.policy == "grace"]
    strict = [t for t in trials if t.policy == "strict"]
    grace_lost = sum(t.outcome != "recovered" for t in grace)
    strict_unreported = sum(t.outcome == "lost" for t in strict)
    strict_max = max((t.requests_after for t in strict if t.outcome == "reauth"), default=0)
    in_grace = sum(t.twice_in_grace for t in trials)
    probes = sum(t.twice_probe for t in trials)
    outside = sum(t.twice_violation for t in trials)
    problems = []
    if outside:
        problems.append(f"{outside} refresh tokens presented twice outside the reuse grace")
    if len(trials) != expected or kills != expected:
        problems.append(f"{kills} of {expected} planned kills happened")
    if doubles:
        problems.append("double successors stored")
    if grace_lost:
        problems.append("credentials lost under grace")
    if strict_unreported:
        problems.append("unreported losses under strict")
    if strict_max > MAX_REQUESTS_AFTER_CRASH:
        problems.append(f"{strict_max} requests after a crash")
    verdict = "requirements met" if not problems else "NOT MET: " + "; ".join(problems)
    line = (
        f"crash_rotation: {kills} kills; the authorization server saw "
        f"{in_grace + probes + outside} refresh tokens presented twice: {in_grace} inside the "
        f"reuse grace (by design), {probes} as the one recovery probe of a no-grace provider "
        f"(rejected, reported as reauthorization_required), {outside} outside the grace "
        f"(violations); {doubles} double successors, grace {grace_lost} lost, "
        f"strict {strict_unreported} unreported losses "
        f"(max {strict_max} request{'s' if strict_max != 1 else ''} after crash) — {verdict}"
    )
    return line, not problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=25, help="kills per policy and crash point")
    parser.add_argument("--parallel", type=int, default=2, help="trials run at a time")
    parser.add_argument("--budget", type=float, default=900.0, help="overall seconds")
    args = parser.parse_args()
    # The audit's broker logs the expected takeovers and rejections; the table says it all.
    logging.getLogger("tokenbroker").addHandler(logging.NullHandler())
    logging.getLogger("tokenbroker").propagate = False

    plan = [(p, point) for _ in range(args.trials) for p in POLICIES for point in POINTS]
    started = time.monotonic()
    trials: list[Trial] = []

    def guarded(item: tuple[Policy, str]) -> Trial | None:
        if time.monotonic() - started > args.budget:
            return None
        try:
            return run_trial(*item)
        except Exception as exc:
            trial = Trial(item[0].name, item[1])
            trial.notes.append(f"trial failed: {exc!r}")
            return trial

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for trial in pool.map(guarded, plan):
            if trial is not None:
                trials.append(trial)
                for note in trial.notes:
                    print(f"  note [{trial.policy} {trial.point}]: {note}")

    titles = {
        "grace": f"policy grace: single use, reuse honoured for {GRACE / 3600:.0f} h",
        "strict": "policy strict: single use, reuse revokes the token family",
    }
    for policy in POLICIES:
        print(titles[policy.name])
        print(render_table(HEADER, cell_rows(trials, policy.name)))
        print()
    elapsed = time.monotonic() - started
    print(f"({len(trials)} trials in {elapsed:.0f} s, {args.parallel} at a time)")
    line, met = summarize(trials, len(plan))
    print(line)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
