"""The audit trail: one ``tokenbroker.audit`` line per token read, invalidation,
delegation and redirect, saying who asked for what and how it ended.

A line is ``EVENT consumer=NAME field=value … outcome=ok|CODE``. Fields are names, scopes,
subjects, objects and token ids (``jti``), never tokens. A value with anything but visible
ASCII (a space, a newline, a quote) is written JSON-quoted, so no input can forge a field or
a line.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

from ..core.scopes import scope_string
from ..engine.consumers import Consumer
from ..errors import InvalidScopeError, TokenBrokerError
from .errors import error_code

__all__ = ["audited", "shown_scope"]

audit = logging.getLogger("tokenbroker.audit")


@contextlib.contextmanager
def audited(event: str, caller: Consumer, **fields: object) -> Iterator[dict[str, object]]:
    """One audit line for what happens inside: consumer, fields, and the outcome
    (``ok`` or the error code). Fields are names, scopes, subjects, objects and token ids
    (``jti``), never tokens. A value with anything but visible ASCII (a space, a newline, a
    quote) is written JSON-quoted, so no input can forge a field or a line.

    Yields:
        The fields, for the block to replace what was asked with what was served (the
        normalised scope, the account) or add to them, before the line is written at the end.
    """
    record: dict[str, object] = dict(fields)

    def line(outcome: str) -> None:
        details = " ".join(f"{name}={_audit_value(value)}" for name, value in record.items())
        audit.info("%s consumer=%s %s outcome=%s", event, caller.name, details, outcome)

    try:
        yield record
    except TokenBrokerError as exc:
        line(error_code(exc))
        raise
    line("ok")


def _audit_value(value: object) -> str:
    text = str(value)
    if text and all("\x21" <= c <= "\x7e" and c != '"' for c in text):
        return text
    return json.dumps(text)


def shown_scope(values: list[str | None]) -> str | None:
    """A request's scope for the audit line: canonical, or ``<invalid>`` (never raw input,
    which could carry a newline into the log)."""
    try:
        return " | ".join(str(scope_string(value)) for value in values)
    except InvalidScopeError:
        return "<invalid>"
