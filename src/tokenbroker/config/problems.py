"""Readable problems from pydantic's validation errors: a dotted field path without pydantic's
tags, a message that never quotes the value, and a "did you mean" hint for a mistyped field.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigProblem
from .sections import Settings

__all__ = ["validation_problems"]


def validation_problems(error: ValidationError, blocked: set[str]) -> list[ConfigProblem]:
    """The problems in ``error``, one per pydantic error, each at its dotted field path.

    Args:
        error: What validating :class:`~tokenbroker.config.Settings` raised.
        blocked: Paths where an environment variable is missing: errors at, below or above
            them are left out, since the missing variable explains them.

    Returns:
        The problems, in pydantic's order; none quotes a value from the file.
    """
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        path = _path(item["loc"])
        if not any(_related(path, b) for b in blocked):
            problems.append(ConfigProblem(path, _message(item)))
    return problems


def _related(path: str, blocked: str) -> bool:
    """A missing variable explains errors at its field, below it and at the models above it."""
    return path == blocked or path.startswith(blocked + ".") or blocked.startswith(path + ".")


#: The tags pydantic puts in a provider's error location (its ``grant``).
_GRANTS = ("client_credentials", "refresh_token", "login")


def _path(loc: tuple[int | str, ...]) -> str:
    # Drop pydantic's discriminator tags ("client_credentials") and model names from the path.
    parts = [str(p) for p in loc]
    if len(parts) >= 3 and parts[0] == "providers" and parts[2] in _GRANTS:
        del parts[2]
    return ".".join(p for p in parts if not p.startswith("function-") and p != "[key]")


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        near = difflib.get_close_matches(str(error["loc"][-1]), _fields_at(error["loc"][:-1]), 1)
        return "is not a known field" + (f" (did you mean {near[0]!r}?)" if near else "")
    if kind == "tuple_type":
        return "must be a list"
    if kind == "union_tag_invalid":
        return "grant must be one of client_credentials, refresh_token, login"
    if kind == "union_tag_not_found":
        return "grant is required (client_credentials, refresh_token or login)"
    if error["loc"][:1] == ("providers",) and error["loc"][-1:] == ("[key]",):
        return "is not a valid provider name (1-64 of a-z, 0-9, '_' and '-')"
    if error["loc"][:1] == ("consumers",) and error["loc"][-1:] == ("[key]",):
        return "is not a valid consumer name (1-64 of letters, digits, '_', '.' and '-')"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the model at ``loc`` in :class:`Settings` (for "did you mean")."""
    node: Any = Settings
    for part in loc:
        node = _step(node, part)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return [f.alias or name for name, f in node.model_fields.items()]
    return []


def _step(node: Any, part: int | str) -> Any:
    """The type one step below ``node`` along a pydantic error location."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        field = node.model_fields.get(str(part))
        return None if field is None else _unwrap(field.annotation, None)
    origin, args = typing.get_origin(node), typing.get_args(node)
    if origin is dict and len(args) == 2:
        return _unwrap(args[1], None)
    if origin is tuple and args:
        return _unwrap(args[0], None)
    if origin in (typing.Union, types.UnionType):
        return _unwrap(node, part)
    return None


def _unwrap(node: Any, tag: int | str | None) -> Any:
    """``node`` without Annotated and None; a union member by its pydantic tag (or if alone)."""
    while typing.get_origin(node) is Annotated:
        node = typing.get_args(node)[0]
    if typing.get_origin(node) not in (typing.Union, types.UnionType):
        return node
    members = [_unwrap(a, None) for a in typing.get_args(node) if a is not type(None)]
    if len(members) == 1:
        return members[0]
    for member in members:
        if isinstance(member, type) and issubclass(member, BaseModel):
            for name in ("grant", "mode"):
                field = member.model_fields.get(name)
                if field is not None and tag in typing.get_args(field.annotation):
                    return member
    return node
