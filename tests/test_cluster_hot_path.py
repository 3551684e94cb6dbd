"""A warm `get_token`/`aget_token` on a broker with a real PostgreSQL store and a real Redis
sends nothing to either: zero PostgreSQL protocol messages on the wire and zero Redis
commands besides the link's own timed health pings."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from redis_server import RedisServer, require_redis
from support import client_credentials, wait_for
from tokenbroker import Broker, parse_settings
from tokenbroker.core.crypto import generate_key
from tokenbroker.testing import AuthorizationServer

KEY = generate_key()
CALLS = 20_000

#: Untyped messages a client may send before its StartupMessage (protocol 3.0: 196608).
_PRE_STARTUP = {80877103: "SSLRequest", 80877104: "GSSENCRequest", 80877102: "CancelRequest"}


class PostgresWire:
    """A pass-through TCP relay in front of PostgreSQL that counts the frontend protocol
    messages every client sends, by type (``Q`` query, ``P``/``B``/``E``/``S`` extended
    query, ``X`` terminate, ``startup`` …): the transport boundary, below psycopg and its
    pool, so nothing a client sends can pass uncounted."""

    def __init__(self, port: int) -> None:
        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sent: Counter[str] = Counter()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def sent(self) -> Counter[str]:
        """A copy of the counts so far (a message is counted before it is forwarded)."""
        with self._lock:
            return Counter(self._sent)

    def url(self, url: str) -> str:
        """``url`` pointed at the relay (no TLS, so the relay can read the messages)."""
        parts = urlsplit(url)
        netloc = f"{parts.username}@127.0.0.1:{self.port}"
        query = f"{parts.query}&" if parts.query else ""
        return urlunsplit(parts._replace(netloc=netloc, query=f"{query}sslmode=disable"))

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            threading.Thread(target=self._frontend, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _frontend(self, source: socket.socket, sink: socket.socket) -> None:
        buffer, started = b"", False
        while data := self._recv(source):
            buffer += data
            while True:
                offset = 0 if not started else 1
                if len(buffer) < offset + 4:
                    break
                (length,) = struct.unpack("!i", buffer[offset : offset + 4])
                if len(buffer) < offset + length:
                    break
                if started:
                    kind = chr(buffer[0])
                else:
                    (code,) = struct.unpack("!i", buffer[4:8])
                    kind = _PRE_STARTUP.get(code, "startup")
                    started = kind == "startup"
                with self._lock:
                    self._sent[kind] += 1
                buffer = buffer[offset + length :]
            try:
                sink.sendall(data)
            except OSError:
                break
        sink.close()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while data := self._recv(source):
            try:
                sink.sendall(data)
            except OSError:
                break
        sink.close()

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""


class RedisCommands:
    """Redis's own count of the commands it has run, by name (``INFO commandstats``), read
    over one connection kept open (a new one would add its own handshake to the count)."""

    def __init__(self, redis: RedisServer) -> None:
        import redis as redis_py  # noqa: PLC0415 - the optional 'redis' extra

        self._client = redis_py.Redis.from_url(redis.url, socket_timeout=5)
        self._client.ping()

    def __call__(self) -> Counter[str]:
        stats: dict[str, dict[str, Any]] = self._client.info("commandstats")
        return Counter(
            {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        )

    def close(self) -> None:
        self._client.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """Our own redis-server on a free port; skipped (failed in CI) when it cannot run."""
    require_redis()
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def wire(postgres_server: Any) -> Iterator[PostgresWire]:
    """The counting relay in front of the session's PostgreSQL."""
    relay = PostgresWire(postgres_server.port)
    yield relay
    relay.close()


def test_warm_get_token_touches_neither_postgres_nor_redis(
    pg_url: str,
    wire: PostgresWire,
    redis_server: RedisServer,
    auth_server: AuthorizationServer,
) -> None:
    """After one fetch, 20,000 `get_token` and 20,000 `aget_token` calls send no PostgreSQL
    message and no Redis command but the link's own pings (one a second, not one per call),
    while the warm-up's fetch was seen on both counters and the provider saw one request."""
    config = {
        "store": wire.url(pg_url),
        "redis": redis_server.url,
        "encryption_keys": [KEY],
        "defaults": {"retries": 0},
        "providers": {"svc": client_credentials(auth_server)},
    }
    commands = RedisCommands(redis_server)
    broker = Broker(parse_settings(yaml.safe_dump(config), {}))
    try:
        wait_for(lambda: broker.coordinator.listening, "the redis subscription")  # type: ignore[union-attr]
        pg_before, redis_before = wire.sent(), commands()
        token = broker.get_token("svc")
        # The counters see the broker's traffic: the fetch wrote through the relay, and
        # announced the new token on Redis (fire-and-forget: wait until Redis has run it,
        # so it cannot land in the window below).
        pg_warm = wire.sent() - pg_before
        assert pg_warm["Q"] + pg_warm["P"] + pg_warm["E"] > 0, pg_warm
        wait_for(lambda: commands()["publish"] > redis_before["publish"], "the fetch's notice")

        async def aget_many() -> None:
            for _ in range(CALLS):
                assert (await broker.aget_token("svc")) is token

        pg_before, redis_before = wire.sent(), commands()
        started = time.monotonic()
        for _ in range(CALLS):
            assert broker.get_token("svc") is token
        asyncio.run(aget_many())
        elapsed = time.monotonic() - started
        pg_after, redis_after = wire.sent(), commands()

        assert pg_after - pg_before == Counter(), "a warm hit sent PostgreSQL messages"
        redis_sent = redis_after - redis_before
        redis_sent.pop("info", None)  # this test's own snapshots
        pings = redis_sent.pop("ping", 0)
        assert redis_sent == Counter(), "a warm hit ran Redis commands"
        # The link pings every second and its subscriber every 5 s, whatever the traffic.
        assert pings <= 2 + 2 * elapsed, f"{pings} pings in {elapsed:.2f} s"
        assert auth_server.count("client_credentials") == 1
    finally:
        broker.close()
        commands.close()
