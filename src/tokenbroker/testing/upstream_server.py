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
import fcntl
import hashlib
import itertools
import json
import logging
import socket
import struct
import termios
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import httpx

from tokenbroker.testing.authserver import AuthorizationServer
from tokenbroker.testing.background import Background

__all__ = ["RecordingUpstream", "UpstreamRecord"]

log = logging.getLogger("tokenbroker.testing.upstream")

PIECE = 64 * 1024
#: Bytes 0..250 repeated, long enough that any 64 KiB piece is one slice of it.
_PATTERN = bytes(range(251)) * (PIECE // 251 + 2)
_MAX_HEADERS = 100
_LINE_LIMIT = 64 * 1024
_IDLE_SECONDS = 30.0
_FLUSH_SECONDS = 2.0
_MAX_SLOW_SECONDS = 600.0


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


class _BadRequestError(Exception):
    """The bytes on the connection are not an HTTP/1.1 request we can answer."""


@dataclass
class _Request:
    method: str
    path: str
    query: str
    version: str
    headers: list[tuple[str, str]]
    body_bytes: int = 0
    body_sha256: str = field(default_factory=lambda: hashlib.sha256().hexdigest())

    def header(self, name: str) -> str:
        values = [v for n, v in self.headers if n == name]
        return ", ".join(values)

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for t in self.header(name).split(",") if t.strip()}

    @property
    def bearer(self) -> str:
        scheme, _, value = self.header("authorization").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""

    def param(self, name: str, default: str = "") -> str:
        values = parse_qs(self.query, keep_blank_values=True).get(name)
        return values[0] if values else default


class _Exchange:
    """The response side of one request: status line and headers, then the body."""

    def __init__(self, writer: asyncio.StreamWriter, request: _Request, keep_alive: bool) -> None:
        self.writer = writer
        self.head_only = request.method == "HEAD"
        self.chunking = request.version == "HTTP/1.1"
        self.keep_alive = keep_alive
        self.aborted = False

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {_reason(status)}"]
        fields = list(headers)
        if not self.keep_alive and not any(n.lower() == "connection" for n, _ in fields):
            fields.append(("Connection", "close"))
        lines += [f"{name}: {value}" for name, value in fields]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()

    async def write(self, data: bytes | memoryview) -> None:
        if not self.head_only and data:
            self.writer.write(data)
            await self.writer.drain()

    async def send(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        await self.start(status, [*headers, ("Content-Length", str(len(body)))])
        await self.write(body)

    async def send_json(
        self, status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        await self.send(status, body, [("Content-Type", "application/json"), *headers])

    async def reset(self) -> None:
        """Flush what was written, then close with SO_LINGER 0 so the kernel sends RST."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FLUSH_SECONDS
        while _unsent(self.writer) and loop.time() < deadline:
            await asyncio.sleep(0.001)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()
        self.keep_alive = False
        self.aborted = True


def _unsent(writer: asyncio.StreamWriter) -> int:
    """Bytes still in asyncio's buffer or the kernel's send queue (unsent or unacked)."""
    pending = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if sock is None:
        return pending
    with contextlib.suppress(OSError):
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        pending += struct.unpack("i", queued)[0]
    return pending


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


Handler = Callable[[_Request, _Exchange], Awaitable[None]]


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
        self._routes: dict[str, tuple[tuple[str, ...], Handler]] = {
            "/api/echo": (("GET", "POST", "PUT"), self._echo),
            "/api/upload": (("POST", "PUT"), self._upload),
            "/api/download": (("GET",), self._download),
            "/api/reset": (("GET",), self._reset),
            "/api/reset-mid": (("GET",), self._reset_mid),
            "/api/slow": (("GET",), self._slow),
            "/api/unframed": (("GET",), self._unframed),
            "/api/redirect": (("GET",), self._redirect),
            "/api/hop": (("GET",), self._hop),
            "/api/trailers": (("GET",), self._trailers),
        }

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

    def _record(self, request: _Request, connection: int) -> None:
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
                server = await asyncio.start_server(accept, "127.0.0.1", 0, limit=_LINE_LIMIT)
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
        exchange: _Exchange | None = None
        try:
            while True:
                try:
                    async with asyncio.timeout(_IDLE_SECONDS):
                        request = await _read_head(reader)
                except TimeoutError:
                    break
                if request is None:
                    break
                self._record(request, connection)
                keep_alive = request.version == "HTTP/1.1" and "close" not in request.tokens(
                    "connection"
                )
                exchange = _Exchange(writer, request, keep_alive)
                body = request.header("content-length") not in ("", "0") or request.header(
                    "transfer-encoding"
                )
                if body and request.tokens("expect") == {"100-continue"}:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await _read_body(reader, request)
                await self._respond(request, exchange)
                if not exchange.keep_alive:
                    break
        except _BadRequestError:
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
                await _close(writer)

    async def _respond(self, request: _Request, exchange: _Exchange) -> None:
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
            methods, handler = ("GET",), self._status
        elif request.path in self._routes:
            methods, handler = self._routes[request.path]
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

    # -- endpoints -----------------------------------------------------------------------

    async def _echo(self, request: _Request, exchange: _Exchange) -> None:
        headers = {name: request.header(name) for name, _ in request.headers}
        payload = {
            # HEAD gets GET's headers, so its Content-Length must be that of GET's body
            "method": "GET" if request.method == "HEAD" else request.method,
            "path": request.path,
            "query": request.query,
            "headers": headers,
            "body_bytes": request.body_bytes,
            "body_sha256": request.body_sha256,
        }
        await exchange.send_json(200, payload)

    async def _upload(self, request: _Request, exchange: _Exchange) -> None:
        await exchange.send_json(200, {"bytes": request.body_bytes, "sha256": request.body_sha256})

    async def _download(self, request: _Request, exchange: _Exchange) -> None:
        size = request.param("bytes", "0")
        if not size.isdigit() or int(size) > 1 << 40:
            await exchange.send_json(400, {"error": "bytes must be an integer 0..2**40"})
            return
        total = int(size)
        chunked = request.param("chunked") == "1"
        framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", size)]
        if chunked and not exchange.chunking:  # HTTP/1.0 has no chunking: delimit by closing
            chunked, framing, exchange.keep_alive = False, [], False
        await exchange.start(200, [("Content-Type", "application/octet-stream"), *framing])
        view = memoryview(_PATTERN)
        offset = 0
        while offset < total and not exchange.head_only:
            piece = min(PIECE, total - offset)
            data = view[offset % 251 : offset % 251 + piece]
            if chunked:
                exchange.writer.write(b"%x\r\n" % piece)
                exchange.writer.write(data)
                exchange.writer.write(b"\r\n")
                await exchange.writer.drain()
            else:
                await exchange.write(data)
            offset += piece
        if chunked:
            await exchange.write(b"0\r\n\r\n")

    async def _status(self, request: _Request, exchange: _Exchange) -> None:
        code = request.path.removeprefix("/api/status/")
        if not (code.isdigit() and 200 <= int(code) <= 599):
            await exchange.send_json(404, {"error": "not_found"})
            return
        status = int(code)
        if status in (204, 304):
            await exchange.start(status, [])
        else:
            await exchange.send_json(status, {"status": status})

    async def _reset(self, request: _Request, exchange: _Exchange) -> None:
        await exchange.reset()

    async def _reset_mid(self, request: _Request, exchange: _Exchange) -> None:
        await exchange.start(200, [("Content-Type", "text/plain"), ("Content-Length", "1000")])
        await exchange.write(b"0123456789")
        await exchange.reset()

    async def _slow(self, request: _Request, exchange: _Exchange) -> None:
        try:
            seconds = float(request.param("seconds", "1"))
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= _MAX_SLOW_SECONDS:
            await exchange.send_json(400, {"error": f"seconds must be 0..{_MAX_SLOW_SECONDS}"})
            return
        await asyncio.sleep(seconds)
        await exchange.send_json(200, {"slept": seconds})

    async def _unframed(self, request: _Request, exchange: _Exchange) -> None:
        await exchange.start(200, [("Content-Type", "text/plain")])
        await exchange.write(b"unframed-body")
        exchange.keep_alive = False

    async def _redirect(self, request: _Request, exchange: _Exchange) -> None:
        await exchange.send_json(302, {"location": "/api/echo"}, [("Location", "/api/echo")])

    async def _hop(self, request: _Request, exchange: _Exchange) -> None:
        persistence = "keep-alive" if exchange.keep_alive else "close"
        headers = [
            ("Connection", f"{persistence}, X-Hop-Secret"),
            ("X-Hop-Secret", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Upgrade", "h2c"),
            ("Trailer", "X-T"),
            ("X-End-To-End", "kept"),
        ]
        await exchange.send_json(200, {"hop": True}, headers)

    async def _trailers(self, request: _Request, exchange: _Exchange) -> None:
        if not exchange.chunking:
            exchange.keep_alive = False
            await exchange.start(200, [("Content-Type", "text/plain")])
            await exchange.write(b"trailer-body")
            return
        framing = [("Transfer-Encoding", "chunked"), ("Trailer", "X-T")]
        await exchange.start(200, [("Content-Type", "text/plain"), *framing])
        await exchange.write(b"8\r\ntrailer-\r\n4\r\nbody\r\n0\r\nX-T: 1\r\n\r\n")


async def _read_head(reader: asyncio.StreamReader) -> _Request | None:
    """Read a request line and header section (RFC 9112 §2-§5); ``None`` at a clean EOF."""
    try:
        line = await reader.readline()
        while line in (b"\r\n", b"\n"):  # RFC 9112 §2.2: ignore empty lines before a request
            line = await reader.readline()
        if not line:
            return None
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise _BadRequestError(line)
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        while (line := await reader.readline()) not in (b"\r\n", b"\n"):
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip() or len(headers) >= _MAX_HEADERS:
                raise _BadRequestError(line)
            headers.append((name.lower(), value.strip()))
    except ValueError as exc:  # a line over the limit
        raise _BadRequestError("line too long") from exc
    if target.startswith(("http://", "https://")):
        parts_ = urlsplit(target)
        path, query = parts_.path or "/", parts_.query
    else:
        path, _, query = target.partition("?")
    return _Request(method, path, query, version, headers)


async def _read_body(reader: asyncio.StreamReader, request: _Request) -> None:
    """Consume the body (RFC 9112 §6.3) in pieces, recording its size and SHA-256."""
    digest = hashlib.sha256()
    size = 0
    async for piece in _body_pieces(reader, request):
        digest.update(piece)
        size += len(piece)
    request.body_bytes = size
    request.body_sha256 = digest.hexdigest()


async def _body_pieces(reader: asyncio.StreamReader, request: _Request) -> AsyncIterator[bytes]:
    coding = request.tokens("transfer-encoding")
    if coding:
        if coding != {"chunked"}:
            raise _BadRequestError("unsupported transfer coding")
        while True:
            line = await reader.readline()
            size = line.split(b";", 1)[0].strip()
            if not size or size.strip(b"0123456789abcdefABCDEF"):
                raise _BadRequestError("bad chunk size")
            left = int(size, 16)
            if left == 0:
                while (line := await reader.readline()) not in (b"\r\n", b"\n"):
                    if not line:
                        raise asyncio.IncompleteReadError(b"", None)
                return
            async for piece in _pieces(reader, left):
                yield piece
            await reader.readexactly(2)
    length = request.header("content-length")
    if not length:
        return
    if not length.isdigit():
        raise _BadRequestError("bad content-length")
    async for piece in _pieces(reader, int(length)):
        yield piece


async def _pieces(reader: asyncio.StreamReader, left: int) -> AsyncIterator[bytes]:
    """Exactly ``left`` bytes from ``reader``, in pieces of at most :data:`PIECE`."""
    while left:
        piece = await reader.read(min(left, PIECE))
        if not piece:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(piece)
        yield piece


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(_FLUSH_SECONDS):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()
