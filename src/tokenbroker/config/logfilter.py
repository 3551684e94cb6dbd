"""``telemetry.log_filter``: per-logger levels in the ``RUST_LOG`` style tpp used.

A filter is comma-separated parts: at most one bare level (the default for every logger),
and ``logger=level`` pairs for a logger and the loggers below it::

    info,tokenbroker.proxy=debug,httpx=warning

Levels are ``trace`` (the same as ``debug``: Python has no lower level), ``debug``,
``info``, ``warn`` or ``warning``, ``error`` and ``off``, in any case. Logger names are
Python's dotted names (``tokenbroker.proxy``, not tpp's ``tpp::proxy``). A bad filter is a
config error naming the part by its position; the text of a part is never quoted, only a
well-formed logger name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

__all__ = ["LEVELS", "LogFilter", "parse_log_filter"]

#: Level words and the :mod:`logging` level each stands for.
LEVELS: dict[str, int] = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": logging.CRITICAL + 10,
}

_LOGGER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*")
_WORDS = ", ".join(LEVELS)


@dataclass(frozen=True)
class LogFilter:
    """A parsed filter.

    Attributes:
        default: The level of every logger not named, or None to keep ``log_level``.
        loggers: ``(logger name, level)`` pairs, in the order written.
    """

    default: int | None
    loggers: tuple[tuple[str, int], ...]


def _level(word: str, where: str) -> int:
    level = LEVELS.get(word.strip().lower())
    if level is None:
        raise ValueError(f"{where}: the level is not one of {_WORDS}")
    return level


def parse_log_filter(text: str) -> LogFilter:
    """Parse a ``RUST_LOG``-style filter.

    Args:
        text: e.g. ``"info,tokenbroker.proxy=debug"``.

    Returns:
        The default level (if the filter gives one) and the per-logger levels.

    Raises:
        ValueError: The filter is empty, a part has no valid level or logger name, the
            default is given twice, or a logger is named twice. The message names the part
            by its position (1-based), never quoting its text.
    """
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise ValueError("is empty: write a level (info) or logger=level pairs")
    default: int | None = None
    loggers: dict[str, int] = {}
    for number, part in enumerate(parts, start=1):
        where = f"part {number}"
        if not part:
            continue
        name, sep, word = part.partition("=")
        if not sep:
            if default is not None:
                raise ValueError(f"{where}: a second default level (give one bare level)")
            default = _level(part, where)
            continue
        name = name.strip()
        if not _LOGGER.fullmatch(name):
            raise ValueError(f"{where}: the logger name is not a dotted name (tokenbroker.proxy)")
        if name in loggers:
            raise ValueError(f"{where}: logger {name} is named twice")
        loggers[name] = _level(word, f"{where} (logger {name})")
    return LogFilter(default, tuple(loggers.items()))
