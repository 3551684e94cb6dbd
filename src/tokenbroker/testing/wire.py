"""HTTP/1.1 on asyncio streams, as the test upstream speaks it (RFC 9112).

:func:`read_head` and :func:`read_body` read one request (the body streamed, hashed, never
kept); an :class:`Exchange` writes its response, or resets the connection (TCP RST) after
flushing what was written. Bytes that are not a request we can answer raise
:class:`BadRequestError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import socket
import struct
import termios
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "LINE_LIMIT",
    "PIECE",
    "BadRequestError",
    "Exchange",
    "WireRequest",
    "close_writer",
    "read_body",
    "read_head",
]

#: The largest piece of a body read or written at once.
PIECE = 64 * 1024
#: The longest request or header line (the stream reader's limit).
LINE_LIMIT = 64 * 1024
_MAX_HEADERS = 100
_FLUSH_SECONDS = 2.0


class BadRequestError(Exception):
    """The bytes on the connection are not an HTTP/1.1 request we can answer."""


@dataclass
class WireRequest:
    """One request as read: its head, and its body's size and SHA-256 once read."""

    method: str
    path: str
    query: str
    version: str
    headers: list[tuple[str, str]]
    body_bytes: int = 0
    body_sha256: str = field(default_factory=lambda: hashlib.sha256().hexdigest())

    def header(self, name: str) -> str:
        """Every value of a header field (lowercase ``name``), joined by ``", "``."""
        values = [v for n, v in self.headers if n == name]
        return ", ".join(values)

    def tokens(self, name: str) -> set[str]:
        """A comma-separated header field's tokens, lowercased."""
        return {t.strip().lower() for t in self.header(name).split(",") if t.strip()}

    @property
    def bearer(self) -> str:
        """The bearer token of ``Authorization``, ``""`` if none."""
        scheme, _, value = self.header("authorization").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""

    def param(self, name: str, default: str = "") -> str:
        """The first value of a query parameter, or ``default``."""
        values = parse_qs(self.query, keep_blank_values=True).get(name)
        return values[0] if values else default


class Exchange:
    """The response side of one request: status line and headers, then the body."""

    def __init__(
        self, writer: asyncio.StreamWriter, request: WireRequest, keep_alive: bool
    ) -> None:
        self.writer = writer
        self.head_only = request.method == "HEAD"
        self.chunking = request.version == "HTTP/1.1"
        self.keep_alive = keep_alive
        self.aborted = False

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """Write the status line and header section (``Connection: close`` when not
        keeping alive)."""
        lines = [f"HTTP/1.1 {status} {_reason(status)}"]
        fields = list(headers)
        if not self.keep_alive and not any(n.lower() == "connection" for n, _ in fields):
            fields.append(("Connection", "close"))
        lines += [f"{name}: {value}" for name, value in fields]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()

    async def write(self, data: bytes | memoryview) -> None:
        """Write body bytes and drain (nothing for HEAD)."""
        if not self.head_only and data:
            self.writer.write(data)
            await self.writer.drain()

    async def send(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        """A whole response with a Content-Length body."""
        await self.start(status, [*headers, ("Content-Length", str(len(body)))])
        await self.write(body)

    async def send_json(
        self, status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """A whole JSON response."""
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


async def read_head(reader: asyncio.StreamReader) -> WireRequest | None:
    """Read a request line and header section (RFC 9112 §2-§5); ``None`` at a clean EOF."""
    try:
        line = await reader.readline()
        while line in (b"\r\n", b"\n"):  # RFC 9112 §2.2: ignore empty lines before a request
            line = await reader.readline()
        if not line:
            return None
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise BadRequestError(line)
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        while (line := await reader.readline()) not in (b"\r\n", b"\n"):
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip() or len(headers) >= _MAX_HEADERS:
                raise BadRequestError(line)
            headers.append((name.lower(), value.strip()))
    except ValueError as exc:  # a line over the limit
        raise BadRequestError("line too long") from exc
    if target.startswith(("http://", "https://")):
        parts_ = urlsplit(target)
        path, query = parts_.path or "/", parts_.query
    else:
        path, _, query = target.partition("?")
    return WireRequest(method, path, query, version, headers)


async def read_body(reader: asyncio.StreamReader, request: WireRequest) -> None:
    """Consume the body (RFC 9112 §6.3) in pieces, recording its size and SHA-256."""
    digest = hashlib.sha256()
    size = 0
    async for piece in _body_pieces(reader, request):
        digest.update(piece)
        size += len(piece)
    request.body_bytes = size
    request.body_sha256 = digest.hexdigest()


async def _body_pieces(reader: asyncio.StreamReader, request: WireRequest) -> AsyncIterator[bytes]:
    coding = request.tokens("transfer-encoding")
    if coding:
        if coding != {"chunked"}:
            raise BadRequestError("unsupported transfer coding")
        while True:
            line = await reader.readline()
            size = line.split(b";", 1)[0].strip()
            if not size or size.strip(b"0123456789abcdefABCDEF"):
                raise BadRequestError("bad chunk size")
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
        raise BadRequestError("bad content-length")
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


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close the connection, waiting up to 2 s for it to flush; abort it after that."""
    writer.close()
    try:
        async with asyncio.timeout(_FLUSH_SECONDS):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()
