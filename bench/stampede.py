"""Stampede: how many token requests N cold callers cause at the same instant.

What is measured. One local ``tokenbroker.testing`` authorization server (127.0.0.1,
``latency`` 50 ms per request, so a fetch is still in flight when the other callers
arrive) counts the ``client_credentials`` token requests it sees; the count is reset
before every row. Each row starts cold and releases N = 100 or 1000 callers together:

* ``tokenbroker threads``: a fresh :class:`tokenbroker.Broker`; N threads, released by a
  ``threading.Barrier``, each call ``broker.get_token("demo")``.
* ``tokenbroker asyncio``: a fresh broker; N tasks in one event loop, released by an
  ``asyncio.Event``, each ``await broker.aget_token("demo")``.
* ``authlib threads``: authlib's documented sync usage: one shared
  ``authlib.integrations.httpx_client.OAuth2Client`` (``token_endpoint`` and
  ``grant_type="client_credentials"``) seeded with an already expired token; N threads
  each ``client.get(server.resource_url)``, so ``ensure_active_token`` re-fetches.
* ``httpx-auth threads``: one shared ``httpx_auth.OAuth2ClientCredentials`` (its class-wide
  token cache cleared first); N threads each ``http.get(server.resource_url, auth=auth)``
  on one shared ``httpx.Client``, like authlib's callers. Not ``httpx.get`` per call: that
  builds a client (an SSL context, ~20 ms of CPU) per caller, which spreads the callers
  out so far that most arrive after the first token is cached. The auth is given its
  documented ``client=`` for token requests; by default it builds a client per fetch,
  and because it fetches one caller at a time under a lock (without re-checking the
  cache) 1000 such fetches would take ~80 s.

Every request has a timeout and every row a deadline; the whole run stays under 120 s.

How to read the output. ``token requests`` is what the server saw for the row (the
ideal is 1: one fetch shared by everyone); ``wall s`` runs from the release to the last
caller finishing (the authlib and httpx-auth callers also make their resource request,
tokenbroker's only get the token, so compare walls within a library, not across);
``errors`` counts callers that raised or got a non-200 answer. The last line is the
one-line summary: tokenbroker's four rows (threads 100/1000, asyncio 100/1000) against
the goal of 1 request and no errors in each, then authlib's and httpx-auth's counts.
"""

from __future__ import annotations

import asyncio
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import httpx_auth

from _common import (
    CLIENT_ID,
    CLIENT_SECRET,
    PROVIDER,
    SCOPE,
    authlib_oauth2_client,
    authorization_server,
    broker_settings,
    render_table,
)
from tokenbroker import Broker
from tokenbroker.testing import AuthorizationServer

SIZES = (100, 1000)
LATENCY = 0.05
REQUEST_TIMEOUT = 30.0
ROW_DEADLINE = 60.0
RUN_BUDGET = 110.0


@dataclass
class Row:
    """One library x N result."""

    library: str
    callers: int
    requests: int
    wall: float
    errors: Counter[str]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def cells(self) -> list[str]:
        kinds = ", ".join(f"{name} x{count}" for name, count in self.errors.most_common(3))
        return [
            self.library,
            str(self.callers),
            str(self.requests),
            f"{self.wall:.2f}",
            str(self.error_count) + (f" ({kinds})" if kinds else ""),
        ]


def ok(response: httpx.Response) -> None:
    """Raise unless the protected resource accepted the token."""
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}")


def stampede_threads(
    callers: int, call: Callable[[], object], deadline: float
) -> tuple[float, Counter[str]]:
    """Release ``callers`` threads together on ``call``; return (wall seconds, errors).

    Threads still running at ``deadline`` (a ``time.monotonic`` reading) count as errors.
    """
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    released: list[float] = []
    barrier = threading.Barrier(
        callers, action=lambda: released.append(time.perf_counter()), timeout=60.0
    )

    def worker() -> None:
        try:
            barrier.wait()
            call()
        except Exception as exc:
            with lock:
                errors[type(exc).__name__] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    finished = time.perf_counter()
    hung = sum(thread.is_alive() for thread in threads)
    if hung:
        errors["still running at deadline"] += hung
    return finished - (released[0] if released else finished), errors


def tokenbroker_threads(server: AuthorizationServer, callers: int, deadline: float) -> Row:
    with Broker(broker_settings(server, timeout=REQUEST_TIMEOUT)) as broker:
        wall, errors = stampede_threads(callers, lambda: broker.get_token(PROVIDER), deadline)
    return Row("tokenbroker threads", callers, server.count("client_credentials"), wall, errors)


def tokenbroker_asyncio(server: AuthorizationServer, callers: int, deadline: float) -> Row:
    async def run() -> tuple[float, Counter[str]]:
        go = asyncio.Event()

        async def one() -> None:
            await go.wait()
            await broker.aget_token(PROVIDER)

        tasks = [asyncio.create_task(one()) for _ in range(callers)]
        await asyncio.sleep(0)
        start = time.perf_counter()
        go.set()
        errors: Counter[str] = Counter()
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        wall = time.perf_counter() - start
        for task in pending:
            task.cancel()
            errors["still running at deadline"] += 1
        for task in done:
            if task.exception() is not None:
                errors[type(task.exception()).__name__] += 1
        return wall, errors

    with Broker(broker_settings(server, timeout=REQUEST_TIMEOUT)) as broker:
        wall, errors = asyncio.run(run())
    return Row("tokenbroker asyncio", callers, server.count("client_credentials"), wall, errors)


def authlib_threads(server: AuthorizationServer, callers: int, deadline: float) -> Row:
    expired = {
        "access_token": "expired-before-the-stampede",
        "token_type": "Bearer",
        "expires_at": int(time.time()) - 600,
    }
    client = authlib_oauth2_client()(
        CLIENT_ID,
        CLIENT_SECRET,
        scope=SCOPE,
        token_endpoint=server.token_url,
        grant_type="client_credentials",
        token=expired,
        timeout=REQUEST_TIMEOUT,
        trust_env=False,
    )
    with client:
        wall, errors = stampede_threads(
            callers, lambda: ok(client.get(server.resource_url)), deadline
        )
    return Row("authlib threads", callers, server.count("client_credentials"), wall, errors)


def httpx_auth_threads(server: AuthorizationServer, callers: int, deadline: float) -> Row:
    httpx_auth.OAuth2.token_cache.clear()
    with (
        httpx.Client(timeout=REQUEST_TIMEOUT, trust_env=False) as http,
        httpx.Client(trust_env=False) as token_http,
    ):
        auth = httpx_auth.OAuth2ClientCredentials(
            server.token_url,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            scope=SCOPE,
            timeout=int(REQUEST_TIMEOUT),
            client=token_http,
        )
        try:
            wall, errors = stampede_threads(
                callers, lambda: ok(http.get(server.resource_url, auth=auth)), deadline
            )
        finally:
            httpx_auth.OAuth2.token_cache.clear()
    return Row("httpx-auth threads", callers, server.count("client_credentials"), wall, errors)


ROWS = (tokenbroker_threads, tokenbroker_asyncio, authlib_threads, httpx_auth_threads)


def main() -> None:
    started = time.monotonic()
    rows: list[Row] = []
    skipped: list[str] = []
    with authorization_server(latency=LATENCY) as server:
        for run in ROWS:
            for callers in SIZES:
                left = RUN_BUDGET - (time.monotonic() - started)
                if left < 5.0:
                    skipped.append(f"{run.__name__} N={callers}")
                    continue
                server.reset_counts()
                rows.append(run(server, callers, time.monotonic() + min(ROW_DEADLINE, left)))
    report(rows, skipped, time.monotonic() - started)


def report(rows: list[Row], skipped: list[str], elapsed: float) -> None:
    print(
        f"stampede: N cold callers released together; token requests the server saw "
        f"(latency {LATENCY * 1000:.0f} ms; CPython {platform.python_version()}, "
        f"{os.cpu_count()} CPUs)"
    )
    header = ["library", "N", "token requests", "wall s", "errors"]
    print(render_table(header, [row.cells() for row in rows]))
    if skipped:
        print(f"skipped (out of the {RUN_BUDGET:.0f} s budget): {', '.join(skipped)}")
    print(f"(run took {elapsed:.1f} s)")
    print()

    def requests(library: str) -> list[str]:
        return [str(row.requests) for row in rows if row.library == library]

    ours = [row for row in rows if row.library.startswith("tokenbroker")]
    errors = sum(row.error_count for row in ours)
    met = len(ours) == 2 * len(SIZES) and all(
        row.requests == 1 and row.error_count == 0 for row in ours
    )
    others = "; ".join(
        f"{name} {'/'.join(requests(f'{name} threads')) or 'skipped'}"
        for name in ("authlib", "httpx-auth")
    )
    print(
        f"stampede: tokenbroker {'/'.join(str(row.requests) for row in ours)} requests, "
        f"{errors} errors (goal 1 and 0 in every row); {others} — "
        f"goal {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
