"""Real OTLP trace receivers on 127.0.0.1 for the tracing tests: gRPC (the collector's
``TraceService``) and HTTP (``POST /v1/traces``, protobuf). Each keeps every request's raw
bytes (for the canary search) and decodes it with ``opentelemetry-proto``."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class SpanView:
    """One exported span, decoded."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    status: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any] = field(default_factory=dict)
    service: str = ""


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


class _Store:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.raw: list[bytes] = []

    def add(self, body: bytes) -> None:
        with self._lock:
            self.raw.append(body)

    def spans(self) -> list[SpanView]:
        """Every span received so far."""
        with self._lock:
            bodies = list(self.raw)
        found: list[SpanView] = []
        for body in bodies:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                service = {a.key: _value(a.value) for a in resource.resource.attributes}
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        found.append(
                            SpanView(
                                span.name,
                                span.trace_id.hex(),
                                span.span_id.hex(),
                                span.parent_span_id.hex(),
                                span.kind,
                                span.status.code,
                                {a.key: _value(a.value) for a in span.attributes},
                                str(service.get("service.name", "")),
                            )
                        )
        return found

    def everything(self) -> bytes:
        """Every byte received."""
        with self._lock:
            return b"".join(self.raw)


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the service's name
        self.store.add(request.SerializeToString())
        return trace_service_pb2.ExportTraceServiceResponse()


class GrpcReceiver(_Store):
    """An OTLP/gRPC receiver; ``url`` is its endpoint (``http://127.0.0.1:PORT``)."""

    def __init__(self) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Self:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None).wait(5)


class HttpReceiver(_Store):
    """An OTLP/HTTP receiver; ``url`` is its base (the exporter posts to ``/v1/traces``)."""

    def __init__(self) -> None:
        super().__init__()
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                store.add(body)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def tree(spans: Iterable[SpanView], *, keys: Iterable[str] = ()) -> str:
    """The spans as an indented tree (children under parents, in the order received), each
    with the attributes named in ``keys`` that it has."""
    spans = list(spans)
    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanView]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in ids else ""
        children.setdefault(parent, []).append(span)
    wanted = list(keys)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in children.get(parent, []):
            shown = " ".join(f"{k}={span.attributes[k]}" for k in wanted if k in span.attributes)
            lines.append(f"{'  ' * depth}{span.name}{' ' + shown if shown else ''}")
            walk(span.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)
