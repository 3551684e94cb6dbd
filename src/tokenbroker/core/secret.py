"""Secrets as a type: a value whose ``repr`` and ``str`` never show it.

Client secrets, passwords, refresh tokens, private keys and API keys travel
through tokenbroker wrapped in :class:`Secret`. Code that really needs the
value calls :meth:`Secret.reveal` at the point of use, so a stray ``print``,
log call, f-string or exception message shows ``**********`` instead.
"""

from __future__ import annotations

import hmac
from typing import Any, NoReturn

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

__all__ = ["REDACTED", "Secret"]

REDACTED = "**********"


class Secret:
    """A redacted string.

    Args:
        value: The secret text.

    Equality is constant-time; secrets are unhashable and refuse pickling, so
    they cannot leak through a cache key or a serialised object.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret value must be a str")
        self._value = value

    def reveal(self) -> str:
        """Return the secret text. Call this only where the value is sent.

        Returns:
            The wrapped string.
        """
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, format_spec: str) -> str:
        return REDACTED

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        """Let pydantic models declare ``Secret`` fields, validated from a string."""
        from_str = core_schema.no_info_after_validator_function(cls, core_schema.str_schema())
        return core_schema.union_schema(
            [core_schema.is_instance_schema(cls), from_str],
            custom_error_type="string_type",
            serialization=core_schema.plain_serializer_function_ser_schema(lambda _: REDACTED),
        )
