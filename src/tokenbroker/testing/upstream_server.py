"""A raw HTTP/1.1 upstream API on 127.0.0.1 that records what reached it, for proxy tests.

:class:`RecordingUpstream` is written directly on asyncio streams (no web framework), so
its wire behaviour is exactly what the endpoints below say, framing faults included. It
runs its own event loop in a background thread::

    with RecordingUpstream(idp) as upstream:
        ...  # send requests to upstream.url (through the proxy under test)
        assert {r.token for r in upstream.records()} <= set(idp.issued_login_tokens)

Every path under ``/api/`` needs ``Authorization: Bearer T`` where ``T`` is a token
``idp`` accepts right now (asked of ``idp.resource_url`` per request, nothing cached;
with no ``idp`` any non-empty bearer passes); otherwise 401 ``invalid_token`` (RFC 6750
§3.1). The request body is always read (streaming, hashed, never kept) before the answer.

Endpoints:

* ``GET|POST|PUT /api/echo``: the request as JSON (method, path, raw query, headers,
  body size and SHA-256).
* ``POST|PUT /api/upload``: ``{"bytes": n, "sha256": hex}`` of the body.
* ``GET /api/download?bytes=N[&chunked=1]``: N bytes, byte ``i`` is ``i % 251``, written
  in 64 KiB pieces with backpressure; Content-Length or chunked framing.
* ``GET /api/status/{code}``: that status (200-599), no body for 204 and 304.
* ``GET /api/reset``: reads the request, then resets the connection (TCP RST).
* ``GET /api/reset-mid``: Content-Length 1000, 10 body bytes, then RST.
* ``GET /api/slow?seconds=S``: answers after S seconds.
* ``GET /api/unframed``: a close-delimited body (no Content-Length, no chunking).
* ``GET /api/redirect``: 302 to ``/api/echo``.
* ``GET /api/hop``: hop-by-hop response headers (RFC 9110 §7.6.1) next to ``X-End-To-End``.
* ``GET /api/trailers``: a chunked body with the trailer field ``X-T: 1`` (RFC 9112 §7.1.2).

``HEAD`` answers like ``GET`` without the body. Unknown paths are 404, other methods 405.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Self

import httpx

from tokenbroker.testing.authserver import AuthorizationServer
from tokenbroker.testing.background import Background
from tokenbroker.testing.upstream_endpoints import ROUTES, Handler, status
from tokenbroker.testing.wire import (
    LINE_LIMIT,
    BadRequestError,
    Exchange,
    WireRequest,
    close_writer,
    read_body,
    read_head,
)

__all__ = ["RecordingUpstream", "UpstreamRecord"]

log = logging.getLogger("tokenbroker.testing.upstream")

_IDLE_SECONDS = 30.0


@dataclass(frozen=True)
class UpstreamRecord:
    """One request as it arrived at the upstream, recorded before it was authorized.

    Attributes:
        client: The request's ``X-Client`` header, ``""`` if none.
        token: The bearer token of its ``Authorization`` header, ``""`` if none.
        method: The request method.
        path: The request path as sent, without the query.
        connection: The id of the TCP connection it arrived on (1, 2, 3... in accept
            order; never reused, not even after :meth:`RecordingUpstream.reset`).
        headers: Every header field in arrival order, names lowercased.
    """

    client: str
    token: str
    method: str
    path: str
    connection: int
    headers: tuple[tuple[str, str], ...]


class RecordingUpstream(Background):
    """An upstream API for proxy tests that records every request (see the module docs).

    Use it as a context manager or call :meth:`start` and :meth:`stop`. The recording
    methods are thread-safe.
    """

    def __init__(self, idp: AuthorizationServer | None = None) -> None:
        """Configure a stopped upstream.

        Args:
            idp: The authorization server whose live tokens ``/api/`` accepts; ``None``
                accepts any non-empty bearer token.
        """
        self._idp = idp
        self._lock = threading.Lock()
        self._records: list[UpstreamRecord] = []
        self._accepted = 0
        self._open: set[int] = set()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._port = 0
        self._verifier: httpx.AsyncClient | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Bind 127.0.0.1 on a free port and serve from a background thread.

        Returns:
            The upstream itself.

        Raises:
            RuntimeError: It is already running, or did not start within 10 seconds.
            OSError: The address cannot be bound.
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the upstream is already running")
            ready: concurrent.futures.Future[int] = concurrent.futures.Future()
            thread = threading.Thread(
                target=self._run, args=(ready,), name="tokenbroker-testing upstream", daemon=True
            )
            self._thread = thread
        thread.start()
        try:
            self._port = ready.result(timeout=10)
        except BaseException:
            self._thread = None
            thread.join(10)
            raise
        return self

    def stop(self) -> None:
        """Stop accepting, drop open connections and wait for the thread; no-op when stopped."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        thread.join(10)

    @property
    def port(self) -> int:
        """The listening port (0 before the first :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT``.

        Raises:
            RuntimeError: The upstream is not running.
        """
        if self._thread is None:
            raise RuntimeError("the upstream is not running; call start()")
        return f"http://127.0.0.1:{self._port}"

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self._port}" if self._thread is not None else "stopped"
        return f"<RecordingUpstream {where} records={len(self._records)}>"

    # -- recording -----------------------------------------------------------------------

    def records(self) -> list[UpstreamRecord]:
        """Every request received, oldest first (a copy).

        Returns:
            The records since the last :meth:`reset`.
        """
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        """Forget the records and zero :attr:`connections_accepted`."""
        with self._lock:
            self._records.clear()
            self._accepted = 0

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since start (or the last :meth:`reset`)."""
        with self._lock:
            return self._accepted

    @property
    def open_connections(self) -> frozenset[int]:
        """Ids (as in :attr:`UpstreamRecord.connection`) of the TCP connections open now;
        one leaves the set once the upstream has seen it close."""
        with self._lock:
            return frozenset(self._open)

    def _record(self, request: WireRequest, connection: int) -> None:
        record = UpstreamRecord(
            client=request.header("x-client"),
            token=request.bearer,
            method=request.method,
            path=request.path,
            connection=connection,
            headers=tuple(request.headers),
        )
        with self._lock:
            self._records.append(record)

    # -- serving -------------------------------------------------------------------------

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        try:
            asyncio.run(self._main(ready))
        except Exception as exc:
            log.exception("the upstream's event loop failed")
            if not ready.done():
                ready.set_exception(exc)

    async def _main(self, ready: concurrent.futures.Future[int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await self._connection(reader, writer)
            except asyncio.CancelledError:
                # Stopping. Python 3.11's stream callback logs a cancelled handler task as
                # an error, so the cancellation ends here.
                pass
            finally:
                connections.discard(task)

        async with httpx.AsyncClient(timeout=10) as self._verifier:
            try:
                server = await asyncio.start_server(accept, "127.0.0.1", 0, limit=LINE_LIMIT)
            except OSError as exc:
                ready.set_exception(exc)
                return
            ready.set_result(server.sockets[0].getsockname()[1])
            await self._stopping.wait()
            server.close()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = next(self._ids)
        with self._lock:
            self._accepted += 1
            self._open.add(connection)
        exchange: Exchange | None = None
        try:
            while True:
                try:
                    async with asyncio.timeout(_IDLE_SECONDS):
                        request = await read_head(reader)
                except TimeoutError:
                    break
                if request is None:
                    break
                self._record(request, connection)
                keep_alive = request.version == "HTTP/1.1" and "close" not in request.tokens(
                    "connection"
                )
                exchange = Exchange(writer, request, keep_alive)
                body = request.header("content-length") not in ("", "0") or request.header(
                    "transfer-encoding"
                )
                if body and request.tokens("expect") == {"100-continue"}:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await read_body(reader, request)
                await self._respond(request, exchange)
                if not exchange.keep_alive:
                    break
        except BadRequestError:
            exchange = None
            with contextlib.suppress(OSError):
                writer.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away
        except Exception:
            log.exception("the upstream failed serving connection %d", connection)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            with self._lock:
                self._open.discard(connection)
            if not (exchange is not None and exchange.aborted):
                await close_writer(writer)

    async def _respond(self, request: WireRequest, exchange: Exchange) -> None:
        if request.path.startswith("/api/"):
            token = request.bearer
            try:
                live = bool(token) and await self._accepts(token)
            except httpx.HTTPError:
                await exchange.send_json(503, {"error": "idp_unavailable"})
                return
            if not live:
                challenge = ("WWW-Authenticate", 'Bearer error="invalid_token"')
                await exchange.send_json(401, {"error": "invalid_token"}, [challenge])
                return
        methods: tuple[str, ...]
        handler: Handler
        if request.path.startswith("/api/status/"):
            methods, handler = ("GET",), status
        elif request.path in ROUTES:
            methods, handler = ROUTES[request.path]
        else:
            await exchange.send_json(404, {"error": "not_found"})
            return
        method = "GET" if request.method == "HEAD" else request.method
        if method not in methods:
            allow = ("Allow", ", ".join(methods + (("HEAD",) if "GET" in methods else ())))
            await exchange.send_json(405, {"error": "method_not_allowed"}, [allow])
            return
        await handler(request, exchange)

    async def _accepts(self, token: str) -> bool:
        if self._idp is None:
            return True
        assert self._verifier is not None
        verdict = await self._verifier.get(
            self._idp.resource_url, headers={"Authorization": f"Bearer {token}"}
        )
        return verdict.status_code == 200
