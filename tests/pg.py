"""pytest plugin: one real PostgreSQL server per test session, a fresh database per test.

``postgres_server`` starts its OWN server (``tokenbroker.testing.postgres.PostgresServer``:
``initdb`` into a temporary folder as the ``postgres`` user, ``pg_ctl`` on a free port of
127.0.0.1) — never the machine's own server on 5432 — and stops it by PID at the end.
``pg_url`` is a new empty database on it, dropped after the test.

In CI (the ``CI`` variable is set) a server that cannot start FAILS the tests that need it;
elsewhere they skip with a message naming what is missing (``make test`` installs
Debian's ``postgresql`` package when ``initdb`` is missing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere, naming ``reason``."""
    message = f"PostgreSQL tests cannot run: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A started PostgreSQL server of our own for the whole session (a PostgresServer)."""
    try:
        import psycopg  # noqa: F401
    except ModuleNotFoundError:
        unavailable("psycopg is not installed: pip install 'tokenbroker[postgres]'")
    from tokenbroker.testing.postgres import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
        server.initdb()
        server.start()
    except PostgresUnavailable as exc:
        unavailable(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres_server: Any) -> Iterator[str]:
    """A fresh, empty database on the session's server: its ``postgresql://`` URL."""
    if postgres_server.pid is None:  # a test that stopped the server failed half-way
        postgres_server.start()
    url: str = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
