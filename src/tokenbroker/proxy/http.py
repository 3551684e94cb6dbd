"""HTTP/1.1 pieces the relay needs: which headers are forwarded, path checks, framing,
the request-head errors the client connection refuses, and error replies.

Failures to get a token are answered from the table the API and BrokerClient share
(:mod:`tokenbroker.edge.statuses`, through :func:`domain_error`).

Headers are handled as raw ``bytes`` pairs exactly as httptools (llhttp) hands them
over; names are compared lowercased.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

from ..core.token import Token
from ..edge.statuses import retry_after, status_of

__all__ = [
    "HOP_BY_HOP",
    "HOP_LINE",
    "MAX_HEAD_BYTES",
    "NEVER_FORWARDED",
    "OVERRIDE_HEADERS",
    "REPLACED_HEADERS",
    "BadFramingError",
    "BadVersionError",
    "HeadTooLargeError",
    "UnknownCodingError",
    "authorization_line",
    "chunk",
    "connection_tokens",
    "domain_error",
    "error_reply",
    "is_unsafe_path",
    "reframed",
    "status_line",
    "strip_hop_by_hop",
]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Headers that describe one hop (RFC 9110 §7.6.1); never forwarded in either direction."""

OVERRIDE_HEADERS = frozenset(
    {
        b"x-original-url",
        b"x-rewrite-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
    }
)
"""Request headers some frameworks (IIS URL Rewrite, Symfony, Laravel, Express
method-override…) obey instead of the request line: they would let a client leave the
route's prefix or its methods. Never forwarded."""

REPLACED_HEADERS = (
    HOP_BY_HOP
    | OVERRIDE_HEADERS
    | {
        b"authorization",
        b"host",
        b"content-length",
        b"expect",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
    }
)
"""Request headers never forwarded as the client sent them: credentials, framing and
forwarding headers are the proxy's own (rebuilt, not appended), and the rest would
override the request line upstream."""

MAX_HEAD_BYTES = 65_536
"""The most bytes a request line and its headers may take (more: 431)."""


class BadFramingError(Exception):
    """A request ``Transfer-Encoding`` that does not end in ``chunked``, or any in HTTP/1.0."""


class UnknownCodingError(Exception):
    """A request transfer coding other than exactly ``chunked`` (``gzip, chunked``…)."""


class BadVersionError(Exception):
    """A request line with an HTTP version other than 1.0 and 1.1."""


class HeadTooLargeError(Exception):
    """The request line and headers exceed :data:`MAX_HEAD_BYTES`."""


NEVER_FORWARDED = frozenset({b"TRACE", b"CONNECT"})
"""Methods refused whatever the route (405, as nginx answers): an upstream answering TRACE
echoes the request, the injected ``Authorization`` with it; CONNECT would open a tunnel."""

LAST_CHUNK = b"0\r\n\r\n"

# Traversal and ambiguity: encoded dots, slashes, backslashes and NULs, raw backslash,
# NUL and '#', dot segments (also with ';' parameters, as Tomcat reads them) and a
# leading '//'. Refused on every route, so a prefix cannot be escaped by an upstream
# that decodes or normalises what we did not.
_UNSAFE = re.compile(rb"%(?:2e|2f|5c|00)|[\\\x00#]|(?:^|/)\.{1,2}(?:[/;]|$)|^//", re.IGNORECASE)


# After one percent-decoding: another escape's start. An upstream (or a framework behind it)
# that decodes twice would see what the checks above refuse ('%252e' -> '%2e' -> '.').
_ESCAPE_LEFT = re.compile(rb"%[0-9a-fA-F]")


def is_unsafe_path(path: bytes) -> bool:
    """True for a request path with a traversal or ambiguity form.

    Refused: dot segments, encoded dots, slashes, backslashes and NULs (``/../``,
    ``%2e``, ``%2f``, ``%5c``, ``%00``), a raw backslash, NUL or ``#``, a leading ``//``;
    a path whose percent-decoding still holds ``%`` and a hex digit (double encoding,
    ``%252e``); and one whose percent-decoding is not valid UTF-8 (overlong forms such as
    ``%c0%ae``, which lenient decoders read as ``.``).
    """
    if _UNSAFE.search(path) is not None:
        return True
    if b"%" not in path and path.isascii():  # the common case: nothing to decode
        return False
    decoded = unquote_to_bytes(path)
    if _ESCAPE_LEFT.search(decoded) is not None:
        return True
    try:
        decoded.decode("utf-8")  # strict: overlong forms and surrogates are errors
    except UnicodeDecodeError:
        return True
    return False


# A hop-by-hop line in lowercased header lines, each preceded by "\n": name and value.
HOP_LINE = re.compile(rb"\n(" + b"|".join(sorted(HOP_BY_HOP)) + rb"):([^\n]*)\n")
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close"})


def strip_hop_by_hop(block: bytes) -> tuple[bytes, set[bytes]]:
    """Cut hop-by-hop lines out of raw header lines (``Name: value\\r\\n`` each).

    Args:
        block: Header lines as received (llhttp validated them: no space before ':').

    Returns:
        The remaining lines, and the other header names a ``Connection`` line listed
        (lowercased; ``keep-alive`` and ``close`` left out).
    """
    probe = b"\n" + block.lower()  # a line at probe[i + 1:] is at block[i:]
    found = HOP_LINE.search(probe)
    listed: set[bytes] = set()
    if found is None:
        return block, listed
    kept, at = [], 0
    while found is not None:
        end = found.end() - 1  # the line's own "\n" ends it and starts the next
        kept.append(block[at : found.start()])
        at = end
        if found.group(1) == b"connection":
            value = found.group(2).strip()
            if value not in _CONNECTION_OPTIONS:
                listed |= connection_tokens(value) - _CONNECTION_OPTIONS
        found = HOP_LINE.search(probe, end)
    kept.append(block[at:])
    return b"".join(kept), listed


def connection_tokens(value: bytes) -> set[bytes]:
    """The lowercased header names a ``Connection`` header lists."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


_AUTH_LINES: dict[str, bytes] = {}


def authorization_line(token: Token) -> bytes:
    """The ``authorization`` header line for ``token``, encoded once per token."""
    line = _AUTH_LINES.get(token.access_token)
    if line is None:
        if len(_AUTH_LINES) >= 4096:  # tokens rotate: keep the memo small
            _AUTH_LINES.clear()
        line = _AUTH_LINES[token.access_token] = b"authorization: %b\r\n" % (
            token.authorization.encode()
        )
    return line


def chunk(data: bytes) -> bytes:
    """One chunk of the chunked transfer coding."""
    return b"%x\r\n%b\r\n" % (len(data), data)


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n``: always the proxy's own version (RFC 9110 §2.5), whatever
    the client's or the upstream's; the reason phrase is informational only."""
    line = _LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"Unknown"))
        if len(_LINES) < 1024:
            _LINES[status] = line
    return line


def error_reply(
    status: int,
    code: str,
    message: str,
    *,
    close: bool = False,
    retry_after: int | None = None,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A whole response with the house error body ``{"error": {"code", "message"}}``.

    Args:
        status: The HTTP status.
        code: The machine-readable error code.
        message: A human sentence; never contains a secret.
        close: Add ``Connection: close``.
        retry_after: Seconds for a ``Retry-After`` header.
        extra: More header pairs.
    """
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        status_line(status),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"cache-control: no-store\r\n",
    ]
    if retry_after is not None:
        head.append(b"retry-after: %d\r\n" % retry_after)
    head.extend(b"%b: %b\r\n" % pair for pair in extra)
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


def domain_error(exc: BaseException) -> tuple[int, str, str, int | None]:
    """Status, code, message and ``Retry-After`` seconds (or None) for a failure, from the
    table the API and BrokerClient share (500 ``internal_error`` when it is not a domain error)."""
    row = status_of(exc)
    message = str(exc) if row.detailed else row.message
    return row.status, row.code, message, retry_after(exc) if row.retry_after else None


def reframed(head: bytes, status: int, chunked: bool, close: bool, http10: bool) -> bytes:
    """An upstream response head rebuilt for the client (the proxy's uncommon case).

    Hop-by-hop lines (and any the upstream's ``Connection`` names) are cut and the status
    line is the proxy's own (``HTTP/1.1``, for 1.0 clients too, as nginx and Envoy answer).

    Args:
        head: The upstream's head as received (status line to the blank line).
        status: Its status.
        chunked: The body is re-chunked toward the client.
        close: The connection closes after this response.
        http10: The client spoke HTTP/1.0 (a kept connection is then said so).

    Returns:
        The head to write to the client.
    """
    first = head.find(b"\r\n")
    block, listed = strip_hop_by_hop(head[first + 2 : len(head) - 2])
    lines = [status_line(status), block]
    if listed:  # rare: drop the headers the upstream's Connection header names
        kept = block.splitlines(keepends=True)
        lines[1] = b"".join([x for x in kept if x.split(b":", 1)[0].lower() not in listed])
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    if close:
        lines.append(b"connection: close\r\n\r\n")
    elif http10:
        lines.append(b"connection: keep-alive\r\n\r\n")
    else:
        lines.append(b"\r\n")
    return b"".join(lines)
