"""Hot path: what one warm cache hit costs, in nanoseconds per call.

What is measured. Every library first fetches a real token from a local
``tokenbroker.testing`` authorization server (and uses it once on the server's protected
resource); then only cache hits are timed, while the server keeps counting token
requests (the run fails if any timed call fetched). The subjects:

* ``bare baseline``: a plain function doing one dict lookup and one
  ``time.monotonic()`` compare, the least any cache hit can cost.
* ``tokenbroker get_token``: ``broker.get_token("demo")``.
* ``tokenbroker aget_token``: ``await broker.aget_token("demo")`` in a loop of awaits
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

How to read the output. ``best`` is the fastest round and ``median`` the typical one,
in ns per call; ``x baseline`` divides each best by the bare baseline's best. The goals
(sync ``get_token`` at most 3x the baseline and at least 10x faster than httpx-auth's
cache hit) use the best rounds. The last line is the one-line summary; the exit status
is 0 either way (it is non-zero only when the run itself is invalid, e.g. a timed call
fetched a token).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

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
    render_table,
    times,
)
from tokenbroker import Broker

ROUNDS = 7
ROUND_NS = 150_000_000
UNROLL = 10
GOAL_VS_BASELINE = 3.0
GOAL_VS_HTTPX_AUTH = 10.0


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


def time_sync(fn: Callable[[Any], Any], arg: Any, loops: int) -> int:
    """Nanoseconds for ``loops * UNROLL`` calls of ``fn(arg)``."""
    start = time.perf_counter_ns()
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
    return time.perf_counter_ns() - start


async def time_async(fn: Callable[[Any], Awaitable[Any]], arg: Any, loops: int) -> int:
    """Nanoseconds for ``loops * UNROLL`` awaits of ``fn(arg)``, in the running loop."""
    start = time.perf_counter_ns()
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
    return time.perf_counter_ns() - start


async def run_once(subject: Subject, loops: int) -> int:
    if subject.is_async:
        return await time_async(subject.fn, subject.arg, loops)
    return time_sync(subject.fn, subject.arg, loops)


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


async def main() -> None:
    started = time.perf_counter()
    httpx_auth.OAuth2.token_cache.clear()
    with authorization_server() as server:
        broker = Broker(broker_settings(server))
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
            # Warm-up: one real token request per library, each token used once.
            token = broker.get_token(PROVIDER)
            await broker.aget_token(PROVIDER)
            alib.fetch_token()
            with httpx.Client(timeout=10.0, trust_env=False) as http:
                check(
                    http.get(server.resource_url, auth=broker.httpx_auth(PROVIDER)), "tokenbroker"
                )
                check(http.get(server.resource_url, auth=xauth), "httpx-auth")
            check(alib.get(server.resource_url), "authlib")
            warm_fetches = server.count("client_credentials")
            if warm_fetches != 3:
                raise SystemExit(f"expected 3 token requests while warming, saw {warm_fetches}")

            bare, abare = bare_baseline(time.monotonic() + TOKEN_LIFETIME)
            xauth_hit = functools.partial(
                httpx_auth.OAuth2.token_cache.get_token,
                early_expiry=xauth.early_expiry,
                on_missing_token=xauth.request_new_token,
                on_expired_token=xauth.refresh_token,
            )
            if broker.get_token(PROVIDER).access_token != token.access_token or not xauth_hit(
                xauth.state
            ):
                raise SystemExit("a warm lookup did not return the cached token")
            request = httpx.Request("GET", server.resource_url)
            subjects = [
                Subject("bare baseline", bare, PROVIDER),
                Subject("tokenbroker get_token", broker.get_token, PROVIDER),
                Subject("httpx-auth cache hit", xauth_hit, xauth.state),
                Subject("authlib ensure_active_token", alib.ensure_active_token, alib.token),
                Subject("bare baseline (async def)", abare, PROVIDER, is_async=True),
                Subject("tokenbroker aget_token", broker.aget_token, PROVIDER, is_async=True),
                Subject("tokenbroker auth flow", one_request(broker.httpx_auth(PROVIDER)), request),
                Subject("httpx-auth auth flow", one_request(xauth), request),
                Subject("authlib auth flow", authlib_request(alib), request),
            ]
            await measure(subjects)
            during = server.count("client_credentials") - warm_fetches
        finally:
            alib.close()
            broker.close()
            httpx_auth.OAuth2.token_cache.clear()
    if during:
        raise SystemExit(f"{during} token requests during timing: not all calls were hits")
    report(subjects, time.perf_counter() - started)


def report(subjects: list[Subject], elapsed: float) -> None:
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

    get = by_name["tokenbroker get_token"].best
    aget = by_name["tokenbroker aget_token"].best
    vs_baseline = get / baseline
    vs_httpx_auth = by_name["httpx-auth cache hit"].best / get
    vs_authlib = by_name["authlib ensure_active_token"].best / get
    vs_abare = aget / by_name["bare baseline (async def)"].best
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
    ]
    print("goals (best rounds):")
    for text, value, met in goals:
        print(f"  {text:<44} {value:>6}  {'met' if met else 'NOT met'}")
    print(f"  (aget_token is {times(vs_abare)} the async-def baseline; no goal)")
    print(f"  token requests during timing: 0; run took {elapsed:.1f} s")
    print()
    met = all(ok for _, _, ok in goals)
    print(
        f"hot_path: get_token {times(vs_baseline)} baseline, "
        f"{times(vs_httpx_auth)} faster than httpx-auth, "
        f"{compared(vs_authlib, 'authlib')} — goals {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    asyncio.run(main())
