"""Hot path: what one warm cache hit costs, in nanoseconds per call, on each store.

What is measured. Every library first fetches a real token from a local
``tokenbroker.testing`` authorization server (and uses it once on the server's protected
resource); then only cache hits are timed, while the server keeps counting token
requests (the run fails if any timed call fetched). tokenbroker is measured twice, on two
brokers side by side: one on a SQLite file (the embedded default) and one in cluster mode,
on PostgreSQL with Redis configured — a hit must cost the same on both, since it touches
neither (``tests/test_cluster_hot_path.py`` counts what reaches the servers). The run
starts its own PostgreSQL (``tokenbroker.testing.postgres.PostgresServer``: ``initdb`` into
a temporary folder, a free port) and its own ``redis-server`` on a free port of 127.0.0.1,
and stops both by PID; ``--store postgresql://…`` uses an existing server instead (a
database of the run's own is created there and dropped), ``--redis redis://…`` an existing
Redis. The subjects:

* ``bare baseline``: a plain function doing one dict lookup and one
  ``time.monotonic()`` compare, the least any cache hit can cost.
* ``tokenbroker get_token (sqlite)`` / ``(postgresql+redis)``: ``broker.get_token("demo")``.
* ``tokenbroker aget_token (…)``: ``await broker.aget_token("demo")`` in a loop of awaits
  inside one running event loop, next to an ``async def`` version of the baseline.
* ``httpx-auth cache hit``: ``OAuth2.token_cache.get_token(auth.state, ...)``, the call
  ``OAuth2ClientCredentials.auth_flow`` makes for every request (its cheapest public
  cache hit).
* ``authlib ensure_active_token``: ``client.ensure_active_token(client.token)`` on an
  ``authlib.integrations.httpx_client.OAuth2Client`` holding a fetched token; it is
  what ``OAuth2Client.request`` calls before every request.
* ``... auth flow`` rows (for context): one request driven through each library's
  ``httpx.Auth`` flow up to the point it would be sent (token lookup plus setting the
  ``Authorization`` header; authlib's is ``ensure_active_token`` plus ``token_auth``).

How it is timed. Each subject is called with one positional argument through a
pre-bound callable, in a ``for`` loop unrolled ten times, with ``time.perf_counter_ns``
around the loop and the garbage collector off. Loops are sized to ~0.15 s; the
subjects take turns, round after round (7 rounds), so background noise hits all alike.
Then the store comparison: 100 short trials (~5 ms per subject) of the baseline and both
brokers, one right after another in a rotating order, timed in this thread's CPU time
(``time.thread_time_ns``, so being preempted by other work does not count); each trial
gives ratios to the baseline and between the stores, and the medians of those are
reported with their quartiles.

How to read the output. ``best`` is the fastest round and ``median`` the typical one,
in ns per call; ``x baseline`` divides each best by the bare baseline's best. The goals
(sync ``get_token`` on SQLite at most 3x the baseline and at least 10x faster than
httpx-auth's cache hit) use the best rounds; the store goal (PostgreSQL + Redis within
1.1x of SQLite, either way) uses the median of the trials. The last line is the one-line
summary; the exit status is 0 either way (it is non-zero only when the run itself is
invalid, e.g. a timed call fetched a token, or PostgreSQL or Redis cannot be started).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import httpx_auth

from _common import (
    CLIENT_ID,
    CLIENT_SECRET,
    PROVIDER,
    SCOPE,
    TOKEN_LIFETIME,
    authlib_oauth2_client,
    authorization_server,
    broker_settings,
    compared,
    redis_server,
    render_table,
    times,
)
from tokenbroker import Broker
from tokenbroker.testing import AuthorizationServer
from tokenbroker.testing.postgres import PostgresServer, PostgresUnavailable

ROUNDS = 7
ROUND_NS = 150_000_000
UNROLL = 10
GOAL_VS_BASELINE = 3.0
GOAL_VS_HTTPX_AUTH = 10.0
GOAL_SAME = 1.1  # pg+redis within 10% of sqlite, either way: the hit touches no store
SQLITE = "sqlite"
CLUSTER = "postgresql+redis"
STORES = (SQLITE, CLUSTER)
TRIALS = 100
TRIAL_NS = 5_000_000


@dataclass
class Subject:
    """One thing to time: ``fn(arg)``, awaited when ``is_async``."""

    name: str
    fn: Callable[[Any], Any]
    arg: Any
    is_async: bool = False
    loops: int = 0
    samples: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def time_sync(
    fn: Callable[[Any], Any], arg: Any, loops: int, clock: Callable[[], int] = time.perf_counter_ns
) -> int:
    """Nanoseconds (of ``clock``) for ``loops * UNROLL`` calls of ``fn(arg)``."""
    start = clock()
    for _ in range(loops):
        fn(arg)
        fn(arg)
        fn(arg)
        fn(arg)
        fn(arg)
        fn(arg)
        fn(arg)
        fn(arg)
        fn(arg)
        fn(arg)
    return clock() - start


async def time_async(
    fn: Callable[[Any], Awaitable[Any]],
    arg: Any,
    loops: int,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> int:
    """Nanoseconds (of ``clock``) for ``loops * UNROLL`` awaits of ``fn(arg)``, in the
    running loop."""
    start = clock()
    for _ in range(loops):
        await fn(arg)
        await fn(arg)
        await fn(arg)
        await fn(arg)
        await fn(arg)
        await fn(arg)
        await fn(arg)
        await fn(arg)
        await fn(arg)
        await fn(arg)
    return clock() - start


async def run_once(
    subject: Subject, loops: int, clock: Callable[[], int] = time.perf_counter_ns
) -> int:
    if subject.is_async:
        return await time_async(subject.fn, subject.arg, loops, clock)
    return time_sync(subject.fn, subject.arg, loops, clock)


async def calibrate(subject: Subject) -> None:
    """Size the loop so one round of ``subject`` takes about ``ROUND_NS``."""
    loops = 1
    while True:
        elapsed = await run_once(subject, loops)
        if elapsed >= ROUND_NS // 10:
            break
        loops *= 4
    subject.loops = max(1, round(loops * ROUND_NS / elapsed))


async def measure(subjects: list[Subject]) -> None:
    """Calibrate, then time every subject once per round, rounds interleaved."""
    gc.collect()
    gc.disable()
    try:
        for subject in subjects:
            await calibrate(subject)
        for _ in range(ROUNDS):
            for subject in subjects:
                elapsed = await run_once(subject, subject.loops)
                subject.samples.append(elapsed / (subject.loops * UNROLL))
    finally:
        gc.enable()


async def interleaved(subjects: list[Subject]) -> list[list[float]]:
    """ns per call of each calibrated subject in each of :data:`TRIALS` short trials.

    A trial runs every subject for about ``TRIAL_NS``, one right after another (the order
    rotates from trial to trial), so within a trial they all see the same load, and times
    them in this thread's CPU time (``time.thread_time_ns``), so time spent preempted by other
    work does not count; ratios taken within a trial, then their median, hold up on a busy
    machine where the best of a few long wall-clock rounds does not.

    Returns:
        One list per trial, in the order of ``subjects``.
    """
    loops = [max(1, s.loops * TRIAL_NS // ROUND_NS) for s in subjects]
    trials = []
    gc.collect()
    gc.disable()
    try:
        for i in range(TRIALS):
            cost = [0.0] * len(subjects)
            for k in range(len(subjects)):
                j = (i + k) % len(subjects)
                elapsed = await run_once(subjects[j], loops[j], time.thread_time_ns)
                cost[j] = elapsed / (loops[j] * UNROLL)
            trials.append(cost)
    finally:
        gc.enable()
    return trials


def bare_baseline(deadline: float) -> tuple[Callable[[str], str], Callable[[str], Awaitable[str]]]:
    """The cheapest possible hit, as a plain function and as an ``async def``."""
    entries = {PROVIDER: ("token", deadline)}
    now = time.monotonic

    def bare(name: str) -> str:
        entry = entries.get(name)
        if entry is not None and now() < entry[1]:
            return entry[0]
        raise LookupError(name)

    async def abare(name: str) -> str:
        entry = entries.get(name)
        if entry is not None and now() < entry[1]:
            return entry[0]
        raise LookupError(name)

    return bare, abare


def one_request(auth: httpx.Auth) -> Callable[[httpx.Request], httpx.Request]:
    """Drive ``auth``'s sync flow for one request up to the point it would be sent."""

    def drive(request: httpx.Request) -> httpx.Request:
        flow = auth.sync_auth_flow(request)
        sent = next(flow)
        flow.close()
        return sent

    return drive


def authlib_request(client: Any) -> Callable[[httpx.Request], httpx.Request]:
    """What ``OAuth2Client.request`` does before sending: check the token, then sign."""
    drive = one_request(client.token_auth)

    def prepare(request: httpx.Request) -> httpx.Request:
        client.ensure_active_token(client.token)
        return drive(request)

    return prepare


def check(response: httpx.Response, who: str) -> None:
    if response.status_code != 200:
        raise SystemExit(f"{who}: the protected resource answered {response.status_code}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ns per warm cache hit, by store")
    parser.add_argument(
        "--store",
        metavar="URL",
        help="a postgresql:// server to use (a database of the run's own is created on it "
        "and dropped) instead of starting a PostgreSQL of its own",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="a redis:// URL to use instead of starting a redis-server of its own",
    )
    return parser.parse_args()


@contextmanager
def postgres_database(server_url: str | None) -> Iterator[str]:
    """A fresh database: on a PostgreSQL of our own (``server_url`` None) or on ``server_url``.

    Yields:
        Its ``postgresql://`` URL; the database (or the whole server) is gone on exit.
    """
    if server_url is None:
        try:
            with PostgresServer() as server:
                yield server.create_database()
        except PostgresUnavailable as exc:
            raise SystemExit(
                f"cannot start PostgreSQL: {exc} (Debian package postgresql, `make test-deps`;"
                " or pass --store postgresql://…)"
            ) from None
        return
    import psycopg

    name = f"tb_hot_path_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    try:
        parts = urlsplit(server_url)
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


@contextmanager
def brokers(
    server: AuthorizationServer, folder: str, args: argparse.Namespace
) -> Iterator[dict[str, Broker]]:
    """The brokers under test, by store label: SQLite (the embedded default) and
    PostgreSQL + Redis (cluster mode), on the same authorization server."""
    with ExitStack() as stack:
        store = stack.enter_context(postgres_database(args.store))
        redis = args.redis or stack.enter_context(redis_server())
        made = {
            SQLITE: Broker(broker_settings(server, store=f"sqlite:///{folder}/tokenbroker.db")),
            CLUSTER: Broker(broker_settings(server, store=store, redis=redis)),
        }
        for broker in made.values():
            stack.callback(broker.close)
        yield made


async def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    httpx_auth.OAuth2.token_cache.clear()
    with (
        authorization_server() as server,
        tempfile.TemporaryDirectory(prefix="tb-hot-path-") as folder,
        brokers(server, folder, args) as by_store,
    ):
        broker, cluster = by_store[SQLITE], by_store[CLUSTER]
        xauth = httpx_auth.OAuth2ClientCredentials(
            server.token_url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, scope=SCOPE
        )
        alib = authlib_oauth2_client()(
            CLIENT_ID,
            CLIENT_SECRET,
            scope=SCOPE,
            token_endpoint=server.token_url,
            grant_type="client_credentials",
            timeout=10.0,
            trust_env=False,
        )
        try:
            # Warm-up: one real token request per library and per store, each token used.
            tokens = {label: b.get_token(PROVIDER) for label, b in by_store.items()}
            for each in by_store.values():
                await each.aget_token(PROVIDER)
            alib.fetch_token()
            with httpx.Client(timeout=10.0, trust_env=False) as http:
                for label, each in by_store.items():
                    check(http.get(server.resource_url, auth=each.httpx_auth(PROVIDER)), label)
                check(http.get(server.resource_url, auth=xauth), "httpx-auth")
            check(alib.get(server.resource_url), "authlib")
            warm_fetches = server.count("client_credentials")
            if warm_fetches != 2 + len(by_store):
                raise SystemExit(
                    f"expected {2 + len(by_store)} token requests warming, saw {warm_fetches}"
                )

            bare, abare = bare_baseline(time.monotonic() + TOKEN_LIFETIME)
            xauth_hit = functools.partial(
                httpx_auth.OAuth2.token_cache.get_token,
                early_expiry=xauth.early_expiry,
                on_missing_token=xauth.request_new_token,
                on_expired_token=xauth.refresh_token,
            )
            for label, each in by_store.items():
                if each.get_token(PROVIDER).access_token != tokens[label].access_token:
                    raise SystemExit(f"a warm lookup ({label}) did not return the cached token")
            if not xauth_hit(xauth.state):
                raise SystemExit("a warm httpx-auth lookup did not return the cached token")
            request = httpx.Request("GET", server.resource_url)
            subjects = [
                Subject("bare baseline", bare, PROVIDER),
                Subject(f"tokenbroker get_token ({SQLITE})", broker.get_token, PROVIDER),
                Subject(f"tokenbroker get_token ({CLUSTER})", cluster.get_token, PROVIDER),
                Subject("httpx-auth cache hit", xauth_hit, xauth.state),
                Subject("authlib ensure_active_token", alib.ensure_active_token, alib.token),
                Subject("bare baseline (async def)", abare, PROVIDER, is_async=True),
                Subject(f"tokenbroker aget_token ({SQLITE})", broker.aget_token, PROVIDER, True),
                Subject(f"tokenbroker aget_token ({CLUSTER})", cluster.aget_token, PROVIDER, True),
                Subject("tokenbroker auth flow", one_request(broker.httpx_auth(PROVIDER)), request),
                Subject("httpx-auth auth flow", one_request(xauth), request),
                Subject("authlib auth flow", authlib_request(alib), request),
            ]
            await measure(subjects)
            named = {subject.name: subject for subject in subjects}
            trials = {
                call: await interleaved(
                    [named[baseline]] + [named[f"tokenbroker {call} ({store})"] for store in STORES]
                )
                for call, baseline in (
                    ("get_token", "bare baseline"),
                    ("aget_token", "bare baseline (async def)"),
                )
            }
            during = server.count("client_credentials") - warm_fetches
        finally:
            alib.close()
            httpx_auth.OAuth2.token_cache.clear()
    if during:
        raise SystemExit(f"{during} token requests during timing: not all calls were hits")
    report(subjects, trials, time.perf_counter() - started)


def spread(ratios: list[float]) -> str:
    """``1.01x (0.97-1.05)``: the median ratio and its quartiles."""
    low, median, high = statistics.quantiles(ratios, n=4)
    return f"{median:.2f}x ({low:.2f}-{high:.2f})"


def by_store(trials: dict[str, list[list[float]]]) -> tuple[list[list[str]], dict[str, float]]:
    """The side-by-side table (medians over the trials) and the pg+redis/sqlite medians."""
    ratios = {
        (call, store): [t[1 + i] / t[0] for t in trials[call]]
        for call in trials
        for i, store in enumerate(STORES)
    }
    rows = [
        [
            store,
            *(
                cell
                for call in trials
                for cell in (
                    f"{statistics.median(t[1 + i] for t in trials[call]):,.0f}",
                    spread(ratios[call, store]),
                )
            ),
        ]
        for i, store in enumerate(STORES)
    ]
    across = {call: [t[2] / t[1] for t in trials[call]] for call in trials}
    rows.append(
        ["pg+redis / sqlite", "", spread(across["get_token"]), "", spread(across["aget_token"])]
    )
    return rows, {call: statistics.median(values) for call, values in across.items()}


def report(subjects: list[Subject], trials: dict[str, list[list[float]]], elapsed: float) -> None:
    by_name = {subject.name: subject for subject in subjects}
    baseline = by_name["bare baseline"].best
    rows = [
        [s.name, f"{s.best:,.0f}", f"{s.median:,.0f}", times(s.best / baseline)] for s in subjects
    ]
    print(
        f"hot path: warm cache hits, ns per call (best and median of {ROUNDS} rounds; "
        f"CPython {platform.python_version()}, {os.cpu_count()} CPUs)"
    )
    print(render_table(["subject", "best ns", "median ns", "x baseline"], rows))
    print()

    side, across = by_store(trials)
    print(
        f"by store: {TRIALS} interleaved trials of {TRIAL_NS / 1e6:g} ms per subject, medians "
        "(quartiles) of the ratios within each trial:"
    )
    head = ["store", "get_token ns", "x baseline", "aget_token ns", "x async baseline"]
    print(render_table(head, side))
    print()

    get = by_name[f"tokenbroker get_token ({SQLITE})"].best
    vs_baseline = get / baseline
    vs_httpx_auth = by_name["httpx-auth cache hit"].best / get
    vs_authlib = by_name["authlib ensure_active_token"].best / get
    vs_abare = by_name[f"tokenbroker aget_token ({SQLITE})"].best / (
        by_name["bare baseline (async def)"].best
    )
    same = across["get_token"]
    goals = [
        (
            f"get_token <= {GOAL_VS_BASELINE:g}x bare baseline",
            times(vs_baseline),
            vs_baseline <= GOAL_VS_BASELINE,
        ),
        (
            f"get_token >= {GOAL_VS_HTTPX_AUTH:g}x faster than httpx-auth",
            times(vs_httpx_auth),
            vs_httpx_auth >= GOAL_VS_HTTPX_AUTH,
        ),
        (
            f"get_token pg+redis / sqlite within {GOAL_SAME:g}x",
            f"{same:.2f}x",
            1 / GOAL_SAME <= same <= GOAL_SAME,
        ),
    ]
    print("goals (best rounds on sqlite; the store ratio: median of the trials):")
    for text, value, met in goals:
        print(f"  {text:<44} {value:>6}  {'met' if met else 'NOT met'}")
    print(f"  (aget_token is {times(vs_abare)} the async-def baseline; no goal)")
    print(f"  token requests during timing: 0; run took {elapsed:.1f} s")
    print()
    met = all(ok for _, _, ok in goals)
    print(
        f"SUMMARY hot_path: get_token {times(vs_baseline)} baseline (sqlite, best round); "
        f"pg+redis/sqlite {same:.2f}x for get_token, {across['aget_token']:.2f}x for "
        f"aget_token (median of {TRIALS} trials); {times(vs_httpx_auth)} faster than "
        f"httpx-auth, {compared(vs_authlib, 'authlib')} — goals {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    asyncio.run(main())
