"""Scopes: the one normalisation of what a caller asked for (RFC 6749 §3.3).

Whatever the spelling — ``None``, ``""``, blanks, repeats, a list — a request's scope
becomes one canonical value here, and that value is what the consumer ACL checks, what
keys the cache and the store, and what is sent to the identity provider. A request is
therefore never sent with fewer scope restrictions than the ACL checked.

The rules:

* ``scope = scope-token *( SP scope-token )`` with
  ``scope-token = 1*( %x21 / %x23-5B / %x5D-7E )``. Only the space (``%x20``) separates;
  a tab, newline, comma, NUL or non-ASCII character makes the scope malformed
  (:class:`~tokenbroker.errors.InvalidScopeError`), never a separator. Extra spaces are
  tolerated. A list (or tuple, set) gives one scope-token per item.
* Scope-tokens are case-sensitive: ``READ`` is not ``read``.
* Repeats are dropped and the tokens sorted, so order and repeats never make a new key.
* Absent or blank (``None``, ``""``, spaces only, an empty list) means the provider's
  configured scopes — not "no scope", which many providers answer with every scope.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import InvalidScopeError

__all__ = ["MAX_SCOPE_LENGTH", "SCOPE_TOKEN", "canonical_scopes", "parse_scope", "scope_string"]

#: One RFC 6749 §3.3 scope-token.
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+\Z")
#: The longest scope accepted, in characters (the HTTP API's limit too).
MAX_SCOPE_LENGTH = 1024
_MALFORMED = "scope must be RFC 6749 scope-tokens separated by spaces"


def parse_scope(scope: object) -> tuple[str, ...] | None:
    """The scope-tokens a caller asked for, sorted and without repeats.

    Args:
        scope: ``None``, a space-separated string, or a list, tuple or set of scope-tokens.

    Returns:
        The sorted unique tokens, or None when the scope is absent or blank.

    Raises:
        InvalidScopeError: Not a string or a collection of strings, a token outside the
            scope-token alphabet (tabs and newlines included), or longer than
            :data:`MAX_SCOPE_LENGTH`.
    """
    if scope is None:
        return None
    items: list[object]
    if isinstance(scope, str):
        items = [item for item in scope.split(" ") if item]
        length = len(scope)
    elif isinstance(scope, list | tuple | set | frozenset):
        items = list(scope)
        length = sum(len(item) + 1 for item in items if isinstance(item, str))
    else:
        raise InvalidScopeError(_MALFORMED)
    if length > MAX_SCOPE_LENGTH:
        raise InvalidScopeError(f"scope must be at most {MAX_SCOPE_LENGTH} characters")
    tokens: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not SCOPE_TOKEN.match(item):
            raise InvalidScopeError(_MALFORMED)
        tokens.add(item)
    return tuple(sorted(tokens)) or None


def canonical_scopes(scope: object, configured: Iterable[str]) -> tuple[str, ...]:
    """The scopes a request stands for: what it asked for, or the configured ones.

    Args:
        scope: As for :func:`parse_scope`.
        configured: The provider's configured scopes (used when ``scope`` is absent or blank).

    Returns:
        Sorted unique scope-tokens; empty only when nothing was asked for and nothing is
        configured (the provider's own default, which only an unrestricted ACL rule allows).

    Raises:
        InvalidScopeError: As for :func:`parse_scope`.
    """
    parsed = parse_scope(scope)
    if parsed is None:
        parsed = parse_scope(tuple(configured))
    return parsed or ()


def scope_string(scope: object) -> str | None:
    """The canonical spelling of a scope: sorted unique tokens joined by one space.

    Args:
        scope: As for :func:`parse_scope`.

    Returns:
        The string, or None when the scope is absent or blank.

    Raises:
        InvalidScopeError: As for :func:`parse_scope`.
    """
    parsed = parse_scope(scope)
    return None if parsed is None else " ".join(parsed)
