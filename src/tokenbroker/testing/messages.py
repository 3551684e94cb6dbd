"""Framework-neutral HTTP messages exchanged between the transport and the protocol.

The transport (:mod:`tokenbroker.testing.transport`) parses bytes off a socket into a
:class:`Request` and writes a :class:`Reply` back; the protocol layer
(:mod:`tokenbroker.testing.protocol`) only ever sees these two types, so it does no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

__all__ = ["Headers", "Reply", "Request"]


class Headers(Mapping[str, str]):
    """An immutable, case-insensitive mapping of HTTP header names to values.

    Iteration yields the names as the peer spelled them. Repeated fields are joined with
    ``", "`` (RFC 9110 §5.3). Compares equal to any mapping with the same items.
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        """Build the mapping.

        Args:
            items: ``(name, value)`` pairs in the order they were received.
        """
        self._values: dict[str, str] = {}
        self._names: dict[str, str] = {}
        for name, value in items:
            key = name.lower()
            if key in self._values:
                self._values[key] = f"{self._values[key]}, {value}"
            else:
                self._names[key] = name
                self._values[key] = value

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names.values())

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


@dataclass(frozen=True)
class Request:
    """One parsed HTTP request.

    Attributes:
        method: The request method, upper case.
        path: The path without the query string.
        query: The decoded query string, every value of every field.
        headers: The request headers.
        body: The raw request body.
        url: The absolute URL the request was addressed to (scheme, host, path, query).
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Headers
    body: bytes
    url: str

    @property
    def form(self) -> dict[str, list[str]]:
        """Decode the body as ``application/x-www-form-urlencoded`` (RFC 6749 Appendix B).

        Returns:
            Every value of every field; an empty dict when the body is not valid UTF-8 form
            data.
        """
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            return {}
        return parse_qs(text, keep_blank_values=True)

    @property
    def first_form(self) -> dict[str, str]:
        """Decode the form body keeping the first value of each field.

        Returns:
            Field name to first value.
        """
        return {name: values[0] for name, values in self.form.items()}

    @property
    def is_json(self) -> bool:
        """Tell whether the body is declared as JSON.

        Returns:
            True when ``Content-Type`` is ``application/json`` or a ``+json`` type.
        """
        media = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        return media == "application/json" or media.endswith("+json")

    def json(self) -> Any:
        """Decode the body as JSON.

        Returns:
            The decoded value.

        Raises:
            ValueError: The body is not valid UTF-8 JSON.
        """
        return json.loads(self.body.decode("utf-8"))


@dataclass(frozen=True)
class Reply:
    """One HTTP response to write back.

    Attributes:
        status: The status code.
        body: The encoded body.
        headers: Header fields in order; the transport adds ``Content-Length``.
    """

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> Reply:
        """Build a JSON reply.

        Args:
            status: The status code.
            payload: A JSON-serialisable value, or an already encoded ``str``/``bytes`` body.
            headers: Extra header fields; a ``Content-Type`` here replaces the default.

        Returns:
            The reply, ``Content-Type: application/json`` unless overridden.
        """
        if isinstance(payload, bytes):
            body = payload
        elif isinstance(payload, str):
            body = payload.encode("utf-8")
        else:
            body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        fields = list(headers)
        if not any(name.lower() == "content-type" for name, _ in fields):
            fields.insert(0, ("Content-Type", "application/json"))
        return cls(status, body, fields)
