"""The test upstream's endpoints under ``/api/`` (listed in :mod:`.upstream_server`).

Each endpoint is ``async (request, exchange) -> None``: the request's body has been read,
and the handler writes the whole response on the :class:`~.wire.Exchange`. :data:`ROUTES`
maps a path to its methods and handler; ``/api/status/{code}`` is :func:`status`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tokenbroker.testing.wire import PIECE, Exchange, WireRequest

__all__ = ["ROUTES", "Handler", "status"]

#: Bytes 0..250 repeated, long enough that any 64 KiB piece is one slice of it.
_PATTERN = bytes(range(251)) * (PIECE // 251 + 2)
_MAX_SLOW_SECONDS = 600.0

Handler = Callable[[WireRequest, Exchange], Awaitable[None]]


async def echo(request: WireRequest, exchange: Exchange) -> None:
    """The request as JSON: method, path, raw query, headers, body size and SHA-256."""
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


async def upload(request: WireRequest, exchange: Exchange) -> None:
    """``{"bytes": n, "sha256": hex}`` of the body."""
    await exchange.send_json(200, {"bytes": request.body_bytes, "sha256": request.body_sha256})


async def download(request: WireRequest, exchange: Exchange) -> None:
    """``?bytes=N[&chunked=1]``: N pattern bytes in 64 KiB pieces, with backpressure."""
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


async def status(request: WireRequest, exchange: Exchange) -> None:
    """``/api/status/{code}``: that status (200-599), no body for 204 and 304; else 404."""
    code = request.path.removeprefix("/api/status/")
    if not (code.isdigit() and 200 <= int(code) <= 599):
        await exchange.send_json(404, {"error": "not_found"})
        return
    status = int(code)
    if status in (204, 304):
        await exchange.start(status, [])
    else:
        await exchange.send_json(status, {"status": status})


async def reset(request: WireRequest, exchange: Exchange) -> None:
    """Reset the connection (TCP RST) after reading the request."""
    await exchange.reset()


async def reset_mid(request: WireRequest, exchange: Exchange) -> None:
    """Promise 1000 body bytes, send 10, then reset the connection."""
    await exchange.start(200, [("Content-Type", "text/plain"), ("Content-Length", "1000")])
    await exchange.write(b"0123456789")
    await exchange.reset()


async def slow(request: WireRequest, exchange: Exchange) -> None:
    """Answer after ``?seconds=S`` (0..600; else 400)."""
    try:
        seconds = float(request.param("seconds", "1"))
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= _MAX_SLOW_SECONDS:
        await exchange.send_json(400, {"error": f"seconds must be 0..{_MAX_SLOW_SECONDS}"})
        return
    await asyncio.sleep(seconds)
    await exchange.send_json(200, {"slept": seconds})


async def unframed(request: WireRequest, exchange: Exchange) -> None:
    """A close-delimited body: no Content-Length, no chunking."""
    await exchange.start(200, [("Content-Type", "text/plain")])
    await exchange.write(b"unframed-body")
    exchange.keep_alive = False


async def redirect(request: WireRequest, exchange: Exchange) -> None:
    """302 to ``/api/echo``."""
    await exchange.send_json(302, {"location": "/api/echo"}, [("Location", "/api/echo")])


async def hop(request: WireRequest, exchange: Exchange) -> None:
    """Hop-by-hop response headers (RFC 9110 §7.6.1) next to an end-to-end one."""
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


async def trailers(request: WireRequest, exchange: Exchange) -> None:
    """A chunked body with the trailer field ``X-T: 1`` (RFC 9112 §7.1.2); close-delimited
    for HTTP/1.0."""
    if not exchange.chunking:
        exchange.keep_alive = False
        await exchange.start(200, [("Content-Type", "text/plain")])
        await exchange.write(b"trailer-body")
        return
    framing = [("Transfer-Encoding", "chunked"), ("Trailer", "X-T")]
    await exchange.start(200, [("Content-Type", "text/plain"), *framing])
    await exchange.write(b"8\r\ntrailer-\r\n4\r\nbody\r\n0\r\nX-T: 1\r\n\r\n")


#: Path → (allowed methods, handler); HEAD is allowed wherever GET is.
ROUTES: dict[str, tuple[tuple[str, ...], Handler]] = {
    "/api/echo": (("GET", "POST", "PUT"), echo),
    "/api/upload": (("POST", "PUT"), upload),
    "/api/download": (("GET",), download),
    "/api/reset": (("GET",), reset),
    "/api/reset-mid": (("GET",), reset_mid),
    "/api/slow": (("GET",), slow),
    "/api/unframed": (("GET",), unframed),
    "/api/redirect": (("GET",), redirect),
    "/api/hop": (("GET",), hop),
    "/api/trailers": (("GET",), trailers),
}
