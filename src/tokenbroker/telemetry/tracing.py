"""OpenTelemetry traces over OTLP: the :class:`~tokenbroker.core.tracing.Tracer` the facade calls.

Imported only when tracing is on (:func:`configure` with an endpoint); it is the one module
that imports ``opentelemetry`` (the ``otel`` extra). The SDK's own provider is used, not the
global one, so a library user's tracing setup is left alone; W3C ``traceparent`` is read from
incoming requests and written on outgoing ones by hand (no global propagator either).

Spans record no exception text (``record_exception`` off): a failure sets the span's status
to error with the exception's class name, and ``error.type``.

A span the sampler is sure to drop — a child of an unsampled parent (the ``ParentBased``
sampler follows the parent), or any root span at ``sample_ratio: 0`` — is made here as a
bare ``NonRecordingSpan`` (fresh span id, the parent's trace id and flags), without the
SDK's span machinery: it still carries the trace context (``traceparent`` goes out), and
costs a fraction of what the SDK's decision path does. A span started by hand (the proxy's)
that is sure to be dropped is cheaper still (:class:`_Unsampled`): a version-00
``traceparent`` is parsed here rather than by the propagator, the span's own value is
formatted once, and the context that makes it current is only built if it is asked for (the
proxy's fast path never asks). Inside an unsampled span, a ``with`` span is the no-op one:
nothing of it would be exported, and the unsampled span around it stays current, so what
goes out still carries the trace's id and its unsampled flag (``bench/tracing.py``).
"""

from __future__ import annotations

import contextvars
import random
import re
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..config.sections import TelemetrySettings
from ..core import tracing as facade

__all__ = ["OtelTracer", "configure", "exporter"]

_KINDS = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT}
_PROPAGATOR = TraceContextTextMapPropagator()
_PORTS = {"grpc": 4317, "http/protobuf": 4318}
_ROOT_FLAGS = TraceFlags(TraceFlags.RANDOM_TRACE_ID)  # as the SDK's random ids set it
_ROOT_HEX = "%02x" % _ROOT_FLAGS  # noqa: UP031
_ids = random.Random()  # noqa: S311 - trace and span ids, as the SDK's id generator


# W3C trace context, version 00 exactly (anything else goes to the SDK's propagator).
_VERSION_00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_SAMPLED_DIGITS = frozenset("13579bdf")  # the last flags digit, with the sampled bit set
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16  # invalid ids


def _random_id(bits: int) -> int:
    while True:
        value = _ids.getrandbits(bits)
        if value:
            return value


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

    @property
    def recording(self) -> bool:
        return self._span.is_recording()

    def end(self) -> None:
        if self._span.is_recording():
            self._span.end()


class _Unsampled:
    """A span started by hand that its trace's sampling drops: the trace context only,
    kept as the hex text it came in as (and goes out as).

    Args:
        trace_id: The trace's id, 32 lower-case hex digits.
        flags: The trace flags, 2 hex digits (the sampled bit clear).
    """

    __slots__ = ("_attached", "_context", "_flags", "_span_id", "_trace_id", "_value")

    recording = False

    def __init__(self, trace_id: str, flags: str) -> None:
        self._trace_id = trace_id
        self._span_id = "%016x" % (_ids.getrandbits(64) or 1)
        self._flags = flags
        self._value = f"00-{trace_id}-{self._span_id}-{flags}"
        self._context = contextvars.copy_context()
        self._attached = False

    def set(self, key: str, value: str | int | float | bool) -> None:
        return None

    def fail(self, error: BaseException | str) -> None:
        return None

    def traceparent(self) -> str:
        return self._value

    @property
    def context(self) -> contextvars.Context:
        """A context in which this span is current (built on first use)."""
        if not self._attached:
            self._attached = True
            ctx = SpanContext(
                int(self._trace_id, 16),
                int(self._span_id, 16),
                False,
                TraceFlags(int(self._flags, 16)),
            )
            self._context.run(otel_context.attach, trace.set_span_in_context(NonRecordingSpan(ctx)))
        return self._context

    def end(self) -> None:
        return None


class _Current:
    """``with``: makes a span current, ends it and restores the context on the way out."""

    __slots__ = ("_context", "_otel", "_token", "_wrapped")

    def __init__(self, otel_span: trace.Span, context: otel_context.Context | None) -> None:
        self._otel = otel_span
        self._context = context
        self._wrapped = _Span(otel_span)

    def __enter__(self) -> _Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._otel, self._context))
        return self._wrapped

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self._wrapped.fail(exc)
        self._otel.end()
        otel_context.detach(self._token)


def _traceparent(ctx: trace.SpanContext) -> str:
    return "00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags)  # noqa: UP031 - faster


def _unsampled(traceparent: str | None) -> tuple[str, str] | None:
    """Trace id and flags (hex) of a valid version-00 ``traceparent`` whose sampled flag is
    clear; None for anything else (no value, sampled, another version, malformed)."""
    if not traceparent or _VERSION_00.fullmatch(traceparent) is None:
        return None
    trace_id, span_id, flags = traceparent[3:35], traceparent[36:52], traceparent[53:]
    if flags[1] in _SAMPLED_DIGITS or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, flags


class OtelTracer:
    """The facade's tracer on an SDK :class:`TracerProvider`.

    Args:
        provider: Where spans go (its processors export them).
    """

    def __init__(self, provider: TracerProvider, *, never: bool = False) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("tokenbroker")
        self._never = never  # sample_ratio 0: every new trace is dropped

    def __repr__(self) -> str:
        return "OtelTracer()"

    def span(
        self,
        name: str,
        attributes: facade.Attributes | None = None,
        *,
        carrier: Mapping[str, str] | None = None,
        kind: str = "internal",
    ) -> AbstractContextManager[Any]:
        if carrier is not None:
            dropped = _unsampled(carrier.get("traceparent"))
            if dropped is not None:  # ParentBased drops it: the caller's context only
                trace_id, flags = int(dropped[0], 16), TraceFlags(int(dropped[1], 16))
                context = SpanContext(trace_id, _random_id(64), False, flags)
                return _Current(NonRecordingSpan(context), None)
            parent = _PROPAGATOR.extract(carrier)
        else:
            parent = None
            above = trace.get_current_span().get_span_context()
            if above.is_valid and not above.trace_flags.sampled:
                return facade.NOOP  # the unsampled span around stays current
        return _Current(self._new(name, parent, kind, attributes), parent)

    def _new(
        self,
        name: str,
        parent: otel_context.Context | None,
        kind: str,
        attributes: facade.Attributes | None,
    ) -> trace.Span:
        above = trace.get_current_span(parent).get_span_context()
        if above.is_valid:
            if not above.trace_flags.sampled:  # ParentBased drops it
                return NonRecordingSpan(
                    SpanContext(above.trace_id, _random_id(64), False, above.trace_flags)
                )
        elif self._never:
            return NonRecordingSpan(
                SpanContext(_random_id(128), _random_id(64), False, _ROOT_FLAGS)
            )
        return self._tracer.start_span(
            name,
            context=parent,
            kind=_KINDS[kind],
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )

    def start(
        self,
        name: str,
        attributes: facade.Attributes | None = None,
        *,
        traceparent: str | None = None,
        kind: str = "internal",
    ) -> _Span | _Unsampled:
        if traceparent:
            dropped = _unsampled(traceparent)
            if dropped is not None:  # ParentBased drops it
                return _Unsampled(*dropped)
            parent = _PROPAGATOR.extract({"traceparent": traceparent})
        else:
            parent = None
            if self._never and not trace.get_current_span().get_span_context().is_valid:
                return _Unsampled("%032x" % _random_id(128), _ROOT_HEX)  # noqa: UP031
        otel_span = self._new(name, parent, kind, attributes)
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
    tracer = OtelTracer(provider, never=ratio <= 0.0)
    facade.install(tracer)
    return tracer
