"""The standard-library HTTP/1.1 transport of the test authorization server.

:class:`BackgroundServer` runs a ``ThreadingHTTPServer`` (one daemon thread per
connection, persistent connections, a 2048-deep accept backlog) in a background thread and
hands every parsed :class:`~tokenbroker.testing.messages.Request` to an *app* callable. The
app returns a :class:`~tokenbroker.testing.messages.Reply`, or ``None`` to close the
connection without answering.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tokenbroker.testing.messages import Headers, Reply, Request

__all__ = ["App", "BackgroundServer"]

log = logging.getLogger("tokenbroker.testing")

#: Serves one request; ``None`` means drop the connection without a response.
App = Callable[[Request], Reply | None]

MAX_BODY_BYTES = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle's algorithm and
    # delayed ACKs add ~40 ms to every keep-alive round trip.
    disable_nagle_algorithm = True
    # Idle keep-alive connections are closed after this many seconds.
    timeout = 30
    server: _HTTPServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def _serve(self) -> None:
        body = self._read_body()
        if body is None:
            return
        target = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=target.path,
            query=parse_qs(target.query, keep_blank_values=True),
            headers=Headers(self.headers.items()),
            body=body,
            url=self.server.base_url + self.path,
        )
        try:
            reply = self.server.app(request)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            reply = Reply.json(500, {"error": "server_error"})
        if reply is None:
            self.close_connection = True
            return
        self._write(reply)

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            self._write(Reply.json(400 if length < 0 else 413, {"error": "invalid_request"}))
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes | None:
        """Read a chunked request body (RFC 9112 §7.1), capped at ``MAX_BODY_BYTES``."""
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0 or len(body) + size > MAX_BODY_BYTES:
                self.close_connection = True
                self._write(Reply.json(400 if size < 0 else 413, {"error": "invalid_request"}))
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields
                return bytes(body)
            body += self.rfile.read(size)
            self.rfile.readline(1024)

    def _write(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers:
            if name.lower() not in ("content-length", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        # The arguments may quote the raw request line (and any token in its query).
        log.debug("http server: %s", format)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self._live: set[socket.socket] = set()
        self._live_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        host, port = self.server_address[:2]
        shown = f"[{host!s}]" if ":" in str(host) else str(host)
        self.base_url = f"http://{shown}:{port}"

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a reverse DNS lookup.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._live_lock:
            self._live.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._live_lock:
            self._live.discard(request)
        super().shutdown_request(request)

    def close_live_connections(self) -> None:
        with self._live_lock:
            live = list(self._live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)


class BackgroundServer:
    """An HTTP/1.1 server bound to ``host:port`` serving ``app`` from a daemon thread."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and start serving.

        Args:
            app: Called once per request, from the connection's thread.
            host: The address to bind.
            port: The port to bind; 0 picks a free ephemeral port.

        Raises:
            OSError: The address cannot be bound.
        """
        self._httpd = _HTTPServer((host, port), app)
        self.url: str = self._httpd.base_url
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"tokenbroker-testing {self.url}",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, close open connections and wait for their threads."""
        self._httpd.shutdown()
        self._httpd.close_live_connections()
        self._httpd.server_close()
        self._thread.join()

    def __repr__(self) -> str:
        return f"BackgroundServer({self.url!r})"
