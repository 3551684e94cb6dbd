"""A local OTLP/gRPC sink for the benches' tracing rows: it accepts every trace export (as
raw bytes, decoding nothing, so it costs the load core little) and counts them."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Self

import grpc

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


class Sink:
    """``with Sink() as sink:`` — an OTLP/gRPC endpoint at ``sink.url``."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()
        export = grpc.unary_unary_rpc_method_handler(self._export)  # bytes in, bytes out
        handler = grpc.method_handlers_generic_handler(SERVICE, {"Export": export})
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), handlers=[handler])
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.url = f"http://127.0.0.1:{port}"

    def _export(self, request: bytes, context: Any) -> bytes:
        with self._lock:
            self.exports += 1
            self.bytes += len(request)
        return b""  # an empty ExportTraceServiceResponse

    def __enter__(self) -> Self:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None).wait(5)
