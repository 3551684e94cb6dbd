"""Request-head limits enforced while a head is read, not after it has been parsed.

httptools (llhttp) hands a header to its protocol only once the header is complete,
and keeps a partial name or value in memory until then; a request target arrives in
pieces. Counting in ``on_header`` alone therefore lets one endless header line (or
target) grow without bound, and a server that checks sizes after parsing has already
buffered the whole head. :class:`HeadBudget` counts two ways:

- exactly, what the parser handed over: the target's pieces and each complete header
  (``name: value\\r\\n``), as the API's middleware counts them;
- raw, every byte fed to the parser while a head is in progress (after a read that held
  the start of a head and the end of an earlier message, from the next read on).

Both are at most the head's size on the wire, so a head within the limit is never
refused; a server that stops reading as soon as the budget is over holds at most the
limit plus one or two socket reads of any head.
"""

from __future__ import annotations

import json

__all__ = ["HEADERS_TOO_LARGE", "MAX_HEAD_BYTES", "HeadBudget", "HeadTooLargeError"]

#: The largest request head (target and headers) the API and the health port accept.
MAX_HEAD_BYTES = 16 * 1024

#: The error body of a 431 answer.
HEADERS_TOO_LARGE = json.dumps(
    {"error": {"code": "headers_too_large", "message": "request headers too large"}}
).encode()


class HeadTooLargeError(Exception):
    """Raised from a parser callback to stop parsing a head that is over its budget."""


class HeadBudget:
    """The bytes of the request head being parsed on one connection, against a limit.

    Call :meth:`begin`, :meth:`parsed`, :meth:`headers_complete` and
    :meth:`message_complete` from the parser's callbacks, and :meth:`fed` after each
    ``feed_data``.

    Args:
        limit: The largest head accepted, in bytes.
    """

    __slots__ = ("_boundary", "_in_head", "_parsed", "_raw", "limit")

    def __init__(self, limit: int = MAX_HEAD_BYTES) -> None:
        self.limit = limit
        self._parsed = 0
        self._raw = 0
        self._in_head = False
        self._boundary = False

    @property
    def over(self) -> bool:
        """The head in progress (or just parsed) is larger than the limit."""
        return self._parsed > self.limit or self._raw > self.limit

    def begin(self) -> None:
        """A new request starts (``on_message_begin``)."""
        self._parsed = self._raw = 0
        self._in_head = True

    def parsed(self, size: int) -> None:
        """The parser handed over ``size`` bytes of the head (a target piece, a header).

        Raises:
            HeadTooLargeError: The head is now over the limit.
        """
        self._parsed += size
        if self._parsed > self.limit:
            raise HeadTooLargeError

    def headers_complete(self) -> None:
        """The head is complete (``on_headers_complete``)."""
        self._in_head = False
        self._boundary = True

    def message_complete(self) -> None:
        """The request is complete (``on_message_complete``)."""
        self._boundary = True

    def fed(self, size: int) -> bool:
        """``size`` bytes were fed to the parser; return whether the head is over the limit."""
        if self._in_head and not self._boundary:  # every byte of that read was head
            self._raw += size
        self._boundary = False
        return self.over

    def __repr__(self) -> str:
        return f"<HeadBudget limit={self.limit} in_head={self._in_head} over={self.over}>"
