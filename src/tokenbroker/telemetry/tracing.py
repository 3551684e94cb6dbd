"""OpenTelemetry traces over OTLP: the :class:`~tokenbroker.core.tracing.Tracer` the facade calls.

Imported only when tracing is on (:func:`configure` with an endpoint); it is the one module
that imports ``opentelemetry`` (the ``otel`` extra). The SDK's own provider is used, not the
global one, so a library user's tracing setup is left alone; W3C ``traceparent`` is read from
incoming requests and written on outgoing ones by hand (no global propagator either).

Spans record no exception text (``record_exception`` off): a failure sets the span's status
to error with the exception's class name, and ``error.type``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..config.sections import TelemetrySettings
from ..core import tracing as facade

__all__ = ["OtelTracer", "configure", "exporter"]

_KINDS = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT}
_PROPAGATOR = TraceContextTextMapPropagator()
_PORTS = {"grpc": 4317, "http/protobuf": 4318}


class _Span:
    """A recorded (or sampled-out) OpenTelemetry span behind the facade's :class:`Span`."""

    __slots__ = ("_span", "context")

    def __init__(self, span: trace.Span, context: contextvars.Context | None = None) -> None:
        self._span = span
        if context is not None:
            self.context = context

    def set(self, key: str, value: str | int | float | bool) -> None:
        self._span.set_attribute(key, value)

    def fail(self, error: BaseException | str) -> None:
        name = error if isinstance(error, str) else type(error).__name__
        self._span.set_attribute("error.type", name)
        self._span.set_status(Status(StatusCode.ERROR, name))

    def traceparent(self) -> str:
        return _traceparent(self._span.get_span_context())

    def end(self) -> None:
        if self._span.is_recording():
            self._span.end()


def _traceparent(ctx: trace.SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class OtelTracer:
    """The facade's tracer on an SDK :class:`TracerProvider`.

    Args:
        provider: Where spans go (its processors export them).
    """

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("tokenbroker")

    def __repr__(self) -> str:
        return "OtelTracer()"

    @contextmanager
    def span(
        self,
        name: str,
        attributes: facade.Attributes | None = None,
        *,
        carrier: Mapping[str, str] | None = None,
        kind: str = "internal",
    ) -> Iterator[_Span]:
        parent = _PROPAGATOR.extract(carrier) if carrier is not None else None
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=_KINDS[kind],
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as otel_span:
            wrapped = _Span(otel_span)
            try:
                yield wrapped
            except BaseException as exc:
                wrapped.fail(exc)
                raise

    def start(
        self,
        name: str,
        attributes: facade.Attributes | None = None,
        *,
        traceparent: str | None = None,
        kind: str = "internal",
    ) -> _Span:
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        otel_span = self._tracer.start_span(
            name, context=parent, kind=_KINDS[kind], attributes=attributes
        )
        context = contextvars.copy_context()
        context.run(otel_context.attach, trace.set_span_in_context(otel_span))
        return _Span(otel_span, context)

    def annotate(self, key: str, value: str | int | float | bool) -> None:
        current = trace.get_current_span()
        if current.is_recording():
            current.set_attribute(key, value)

    def traceparent(self) -> str | None:
        ctx = trace.get_current_span().get_span_context()
        return _traceparent(ctx) if ctx.is_valid else None

    def ids(self) -> tuple[str, str] | None:
        ctx = trace.get_current_span().get_span_context()
        return (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}") if ctx.is_valid else None

    def shutdown(self) -> None:
        self.provider.shutdown()


def exporter(settings: TelemetrySettings, environ: Mapping[str, str], url: str) -> SpanExporter:
    """The OTLP exporter for ``url`` in the configured protocol (gRPC by default).

    A URL without a scheme is taken as ``http://``, without a port as the protocol's
    (4317 gRPC, 4318 HTTP); HTTP posts to ``/v1/traces`` when the URL has no path.
    """
    protocol = (
        settings.otlp_protocol
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol not in _PORTS:
        raise ValueError(f"unsupported OTLP protocol {protocol!r} (grpc or http/protobuf)")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.port is None:
        url = parts._replace(netloc=f"{parts.netloc}:{_PORTS[protocol]}").geturl()
    headers = {k: v.reveal() for k, v in settings.headers.items()} or None
    if protocol == "grpc":
        # Only the protocol in use is imported (gRPC's runtime is large).
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        insecure = urlsplit(url).scheme == "http"
        return OTLPSpanExporter(endpoint=url, insecure=insecure, headers=headers)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as HttpExporter,
    )

    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=url, headers=headers)


def configure(
    settings: TelemetrySettings,
    environ: Mapping[str, str],
    *,
    span_exporter: SpanExporter | None = None,
    **batch: Any,
) -> OtelTracer | None:
    """Build the tracer from ``settings`` and install it in the facade; None when no
    endpoint is configured (then nothing is installed).

    Args:
        settings: The ``telemetry:`` section.
        environ: The process environment (the ``OTEL_*`` variables).
        span_exporter: Export here instead of OTLP (tests, benchmarks).
        batch: Passed to :class:`BatchSpanProcessor` (``schedule_delay_millis`` …).

    Returns:
        The installed tracer (call its ``shutdown()`` at exit to flush), or None.
    """
    url = settings.endpoint(environ)
    if url is None and span_exporter is None:
        return None
    ratio = settings.sample_ratio
    if ratio is None:
        ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    name = settings.service_name or environ.get("OTEL_SERVICE_NAME") or "tokenbroker"
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(ratio)),
        resource=Resource.create({"service.name": name}),
        shutdown_on_exit=False,
    )
    chosen = span_exporter or exporter(settings, environ, url or "")
    provider.add_span_processor(BatchSpanProcessor(chosen, **batch))
    tracer = OtelTracer(provider)
    facade.install(tracer)
    return tracer
