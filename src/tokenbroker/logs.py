"""Log output for the command line and the server: JSON lines (or text) on stderr.

The library only logs through ``logging.getLogger("tokenbroker.…")``; this
module, used by the CLI alone, installs the handler. Each JSON line carries the
request id of the HTTP request being served, if any.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "configure", "request_id"]

#: The id of the HTTP request being handled (set by the request middleware).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tokenbroker_request_id", default=None
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, exception class."""

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
        if record.exc_info and record.exc_info[0] is not None:
            # The class only: exception text can quote values we must not log.
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_installed: logging.Handler | None = None


_last_second: tuple[int, str] = (0, "")


def _timestamp(created: float, msecs: float) -> str:
    global _last_second  # noqa: PLW0603 - a one-entry cache of the formatted second
    second = int(created)
    if _last_second[0] != second:
        _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_last_second[1]}.{int(msecs):03d}Z"


def configure(level: str = "info", fmt: str = "json") -> None:
    """Send log records to stderr in ``fmt`` (``json`` or ``text``) at ``level``.

    Calling it again replaces the handler it installed before (and nothing else).

    Args:
        level: debug, info, warning or error.
        fmt: ``json`` or ``text``.
    """
    global _installed  # noqa: PLW0603 - one handler per process, replaced on reconfiguration
    handler = _Stderr()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at info; tokenbroker's own lines already say what matters
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    _installed = handler
