"""The tracing facade: what the engine, the grants, the API and the proxy call to make spans.

Off by default: :data:`tracer` is None, :func:`span` hands back one shared no-op object and
the hot paths (a cache hit, the proxy's fast path) test ``tracing.tracer is None`` and do
nothing else. Nothing here imports OpenTelemetry; :mod:`tokenbroker.telemetry.tracing`
implements :class:`Tracer` with it and installs it (:func:`install`) when
``telemetry.otlp_endpoint`` (or ``OTEL_EXPORTER_OTLP_*``) is set.

What goes into a span is chosen at the call site from an allow-list of values that are
never secret: provider, scope, account, route names, statuses, counts, durations,
exception class names. Never a token, a key, a client secret or a query string.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

__all__ = [
    "NOOP",
    "Attributes",
    "Span",
    "Started",
    "Tracer",
    "annotate",
    "inject",
    "install",
    "span",
    "tracer",
]

#: Span attribute values: what OpenTelemetry accepts, and what may be shown to anyone.
Attributes = Mapping[str, str | int | float | bool]


class Span(Protocol):
    """A span being recorded (or the no-op stand-in)."""

    def set(self, key: str, value: str | int | float | bool) -> None:
        """Set an attribute (a value that is never secret)."""

    def fail(self, error: BaseException | str) -> None:
        """Mark the span failed; only the exception's class name is recorded, never its text."""


class Started(Span, Protocol):
    """A span started by hand (:meth:`Tracer.start`), ended by :meth:`end`; for work that
    is not one ``with`` block (a proxied request driven by callbacks)."""

    @property
    def context(self) -> contextvars.Context:
        """A context in which this span is current: run a task in it to parent its spans."""

    def traceparent(self) -> str:
        """This span's W3C ``traceparent`` value (for an outgoing request)."""

    @property
    def recording(self) -> bool:
        """False for a span its trace's sampling dropped (attributes would be thrown away)."""

    def end(self) -> None:
        """End the span (a second call does nothing)."""


class Tracer(Protocol):
    """What :mod:`tokenbroker.telemetry.tracing` provides."""

    def span(
        self,
        name: str,
        attributes: Attributes | None = None,
        *,
        carrier: Mapping[str, str] | None = None,
        kind: str = "internal",
    ) -> AbstractContextManager[Span]:
        """A span current inside the ``with`` block; an exception leaving it marks it failed.

        Args:
            name: The span's name (``tokenbroker.…``).
            attributes: Its first attributes.
            carrier: Incoming headers whose ``traceparent`` continues the caller's trace.
            kind: ``internal``, ``server`` or ``client``.
        """

    def start(
        self,
        name: str,
        attributes: Attributes | None = None,
        *,
        traceparent: str | None = None,
        kind: str = "internal",
    ) -> Started:
        """A span started now, child of ``traceparent`` if given, else of the current span."""

    def annotate(self, key: str, value: str | int | float | bool) -> None:
        """Set an attribute on the current span, if any."""

    def traceparent(self) -> str | None:
        """The current span's ``traceparent`` value, or None outside a recorded span."""

    def ids(self) -> tuple[str, str] | None:
        """The current span's trace id and span id in hex (for log lines), or None."""

    def shutdown(self) -> None:
        """Export what is buffered and stop."""


class _Noop:
    """The span handed out while tracing is off: every method does nothing."""

    __slots__ = ()

    def __enter__(self) -> _Noop:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set(self, key: str, value: str | int | float | bool) -> None:
        return None

    def fail(self, error: BaseException | str) -> None:
        return None


#: The shared no-op span (and its own context manager).
NOOP = _Noop()

#: The installed tracer; None while tracing is off (the hot paths test exactly this).
tracer: Tracer | None = None


def install(new: Tracer | None) -> Tracer | None:
    """Make ``new`` the tracer every instrumented point uses (None: tracing off).

    Args:
        new: The tracer, or None.

    Returns:
        The tracer installed before.
    """
    global tracer
    old, tracer = tracer, new
    return old


def span(
    name: str,
    attributes: Attributes | None = None,
    *,
    carrier: Mapping[str, str] | None = None,
    kind: str = "internal",
) -> AbstractContextManager[Any]:
    """``with span(name, attributes) as s:`` — a span when tracing is on, else :data:`NOOP`.

    Args:
        name: The span's name.
        attributes: Its first attributes (never secret).
        carrier: Incoming headers whose ``traceparent`` continues the caller's trace.
        kind: ``internal``, ``server`` or ``client``.
    """
    current = tracer
    if current is None:
        return NOOP
    return current.span(name, attributes, carrier=carrier, kind=kind)


def annotate(key: str, value: str | int | float | bool) -> None:
    """Set an attribute on the current span, if tracing is on and a span is current."""
    current = tracer
    if current is not None:
        current.annotate(key, value)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` to outgoing ``headers`` (tracing on only)."""
    current = tracer
    if current is not None:
        value = current.traceparent()
        if value is not None:
            headers["traceparent"] = value
