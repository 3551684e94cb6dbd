"""Log output for the command line and the server: JSON lines (or text) on stderr.

The library only logs through ``logging.getLogger("tokenbroker.…")``; this
module, used by the CLI alone, installs the handler. Each JSON line carries the
request id of the HTTP request being served, if any, and with tracing on the ``trace_id``
and ``span_id`` of the span it was written in.

Log lines quote request input (provider names, audiences, routes, accounts). JSON escapes
it; the text format escapes it here, in one place (:class:`TextFormatter`), so no value can
end a line and start a forged record, whichever call site or field logged it.

Structured fields: a record's ``extra=`` values whose names are in :data:`FIELDS` become
keys of its JSON line (the text format shows them when its format names them). Other extras
are left out — an allow-list, so a value nobody reviewed (uvicorn's ``color_message``, a
field someone named ``password``) never reaches a log line by accident.

Job log lines (issue 16) follow one convention, on the ``tokenbroker.jobs`` logger: the
fields ``event`` (``job_started``, ``job_phase``, ``job_item_failed``, ``job_finished``),
``job_id``, ``kind``, ``phase`` and ``elapsed_ms``, plus ``status``, ``item``, ``reason``
where they apply. :func:`log_job_event` writes them from the job lifecycle events of
:mod:`tokenbroker.core.events`; subscribe it with ``broker.subscribe(log_job_event)``. One
line per start, phase change, failed item and finish — never one per successful item.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any

from ..config.logfilter import parse_log_filter
from ..core import tracing
from ..core.events import Event, JobEvent, JobFinished, JobItemFinished, JobPhaseChanged, JobStarted

__all__ = [
    "FIELDS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "escape",
    "job_logger",
    "log_job_event",
    "request_id",
]

#: The ``extra=`` names a JSON line carries as its own keys (see the module docstring).
FIELDS = frozenset(
    {
        "attempts",
        "elapsed_ms",
        "error_type",
        "event",
        "failed",
        "item",
        "job_id",
        "kind",
        "ok",
        "phase",
        "provider",
        "reason",
        "retryable",
        "status",
    }
)

#: Where job log lines go.
job_logger = logging.getLogger("tokenbroker.jobs")

#: The id of the HTTP request being handled (set by the request middleware).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tokenbroker_request_id", default=None
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, trace and span
    ids (inside a span), exception class,
    and the record's :data:`FIELDS` extras (numbers, booleans and None as they are; any
    other value as its ``str``, so a :class:`~tokenbroker.core.secret.Secret` stays redacted)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        tracer = tracing.tracer
        ids = tracer.ids() if tracer is not None else None
        if ids is not None:  # written inside a span (tracing on)
            entry["trace_id"], entry["span_id"] = ids
        fields = FIELDS.intersection(record.__dict__)
        for name in sorted(fields):
            value = record.__dict__[name]
            ok = value is None or isinstance(value, bool | int | float)
            entry[name] = value if ok else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            # The class only: exception text can quote values we must not log.
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)


#: The text format's fields (each escaped by :class:`TextFormatter`).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# What a terminal or a line-based log reader takes for the end of a line or for a command:
# C0 controls (CR, LF, ESC ...), DEL, C1 controls (NEL ...), the Unicode line and paragraph
# separators, and the bidirectional overrides that make text display as other text. The
# backslash too, so that an escape in the output was made here, never typed by a client.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\\\\]")


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control character written as a visible escape.

    Args:
        text: Any text.

    Returns:
        The text on one line: ``\\n`` becomes ``\\x0a``, U+2028 becomes ``\\u2028``, a backslash
        becomes two; everything else is unchanged.
    """
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escaped, text)


class TextFormatter(logging.Formatter):
    """One line per record, every field escaped (:func:`escape`): the message with its
    arguments, and any other record attribute the format names (``extra=`` fields too).

    As in JSON, an exception is shown by its class only: its text and traceback can quote
    values that must not be logged, and span lines.

    Args:
        fmt: A ``%``-style format; default :data:`TEXT_FORMAT`.
    """

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and record.exc_info[0] is not None:
            line += f" exception={escape(record.exc_info[0].__name__)}"
        return line


_JOB_EVENT_NAMES: dict[type[JobEvent], str] = {
    JobStarted: "job_started",
    JobPhaseChanged: "job_phase",
    JobItemFinished: "job_item_failed",
    JobFinished: "job_finished",
}


def log_job_event(event: Event) -> None:
    """Write one ``tokenbroker.jobs`` log line for a job lifecycle event (a broker
    subscriber; other events and successful items are ignored).

    Levels: info for a start, a phase change and a ``done`` or ``canceled`` finish;
    warning for a failed item and a ``partial`` or ``failed`` finish.

    Args:
        event: Any broker event.
    """
    if not isinstance(event, JobEvent) or type(event) not in _JOB_EVENT_NAMES:
        return
    name = _JOB_EVENT_NAMES[type(event)]
    if isinstance(event, JobItemFinished) and event.outcome == "ok":
        return
    fields: dict[str, Any] = {
        "event": name,
        "job_id": event.job_id,
        "kind": event.kind,
        "phase": getattr(event, "phase", None),
        "elapsed_ms": round(event.elapsed * 1000, 1),
    }
    if event.provider:
        fields["provider"] = event.provider
    level = logging.INFO
    if isinstance(event, JobStarted):
        message = "job %s started" + (" (resumed)" if event.resumed else "")
        args: tuple[Any, ...] = (event.kind,)
    elif isinstance(event, JobPhaseChanged):
        message, args = "job %s entered phase %s", (event.kind, event.phase)
    elif isinstance(event, JobItemFinished):
        level = logging.WARNING
        fields.update(item=event.item, reason=event.reason, retryable=event.retryable)
        fields["attempts"] = event.attempts
        message, args = "job %s item failed: %s", (event.kind, event.reason)
    else:
        assert isinstance(event, JobFinished)
        if event.status in {"partial", "failed"}:
            level = logging.WARNING
        fields.update(status=event.status, ok=event.ok, failed=event.failed)
        if event.error_type is not None:
            fields["error_type"] = event.error_type
        message, args = "job %s %s", (event.kind, event.status)
    job_logger.log(level, message, *args, extra=fields)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_installed: logging.Handler | None = None
#: The loggers whose level the last filter set (put back to NOTSET on reconfiguration).
_filtered: list[str] = []


_last_second: tuple[int, str] = (0, "")


def _timestamp(created: float, msecs: float) -> str:
    global _last_second  # noqa: PLW0603 - a one-entry cache of the formatted second
    second = int(created)
    if _last_second[0] != second:
        _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_last_second[1]}.{int(msecs):03d}Z"


def configure(level: str = "info", fmt: str = "json", log_filter: str | None = None) -> None:
    """Send log records to stderr in ``fmt`` (``json`` or ``text``) at ``level``.

    Calling it again replaces the handler it installed before, and the per-logger levels
    its ``log_filter`` set (and nothing else).

    Args:
        level: debug, info, warning or error.
        fmt: ``json`` or ``text``.
        log_filter: Per-logger levels, ``RUST_LOG`` style (``info,tokenbroker.proxy=debug``,
            :mod:`tokenbroker.config.logfilter`); its bare level replaces ``level``.

    Raises:
        ValueError: ``log_filter`` is not a valid filter (nothing is changed then).
    """
    global _installed  # noqa: PLW0603 - one handler per process, replaced on reconfiguration
    parsed = parse_log_filter(log_filter) if log_filter is not None else None
    handler = _Stderr()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if parsed is not None and parsed.default is not None:
        root.setLevel(parsed.default)
    for name in _filtered:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _filtered.clear()
    # httpx logs every request at info; tokenbroker's own lines already say what matters
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    for name, value in parsed.loggers if parsed is not None else ():
        logging.getLogger(name).setLevel(value)
        _filtered.append(name)
    _installed = handler
