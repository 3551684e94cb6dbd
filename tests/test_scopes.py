"""Scope normalisation: every spelling becomes one canonical value or a clear InvalidScopeError."""

from __future__ import annotations

import pytest

from tokenbroker.core.rules import parse_rule
from tokenbroker.core.scopes import MAX_SCOPE_LENGTH, canonical_scopes, parse_scope, scope_string
from tokenbroker.engine.consumers import Consumer
from tokenbroker.errors import InvalidScopeError, UnknownProviderError


@pytest.mark.parametrize(
    ("spelling", "parsed"),
    [
        (None, None),
        ("", None),
        (" ", None),
        ("    ", None),
        ([], None),
        ((), None),
        (frozenset(), None),
        ("read", ("read",)),
        ("  read  ", ("read",)),
        ("read read", ("read",)),
        ("write read", ("read", "write")),
        ("read  write write", ("read", "write")),
        (["write", "read", "read"], ("read", "write")),
        (("read",), ("read",)),
        ({"write", "read"}, ("read", "write")),
        ("READ read", ("READ", "read")),
        ("read,write", ("read,write",)),
        ("https://api.example/read!", ("https://api.example/read!",)),
    ],
)
def test_spellings_parse_to_sorted_unique_tokens(spelling: object, parsed: object) -> None:
    """Only SP separates; repeats and order never matter; case does; blank is None."""
    assert parse_scope(spelling) == parsed
    assert scope_string(spelling) == (None if parsed is None else " ".join(parsed))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spelling",
    [
        "\t",
        "\n",
        "\r\n",
        "\x0b",
        "\x0c",
        "\x00",
        "read\twrite",
        "read\nwrite",
        "read\u00a0write",
        "r\u00e9ad",
        'say"hi"',
        "back\\slash",
        "\x7f",
        [""],
        [" "],
        ["read write"],
        ["read", None],
        [b"read"],
        b"read",
        bytearray(b"read"),
        7,
        {"scope": "read"},
        "a" * (MAX_SCOPE_LENGTH + 1),
        ["a"] * (MAX_SCOPE_LENGTH // 2 + 1),
    ],
)
def test_malformed_spellings_are_refused(spelling: object) -> None:
    """Tabs, newlines, NUL, non-ASCII, '"' and '\\', non-strings and over-long scopes raise
    InvalidScopeError, an UnknownProviderError, whose message never echoes the input."""
    with pytest.raises(InvalidScopeError) as caught:
        parse_scope(spelling)
    assert isinstance(caught.value, UnknownProviderError)
    assert "\n" not in str(caught.value)


def test_blank_means_the_configured_scopes() -> None:
    """Absent or blank gets the configured scopes (canonical too); anything else is as asked."""
    for blank in (None, "", "   ", []):
        assert canonical_scopes(blank, ["write", "read", "read"]) == ("read", "write")
        assert canonical_scopes(blank, ()) == ()
    assert canonical_scopes("write", ["read"]) == ("write",)


def test_the_acl_is_case_sensitive_and_an_empty_set_needs_an_unrestricted_rule() -> None:
    """svc:read allows ("read",) only: not READ, not more, and not the empty set (no scope),
    which only a rule without scopes allows."""
    reader = Consumer("reader", (parse_rule("svc:read"),))
    anything = Consumer("any", (parse_rule("svc"),))
    assert reader.allows("svc", canonical_scopes("", ["read"]))
    assert not reader.allows("svc", canonical_scopes("READ", ["read"]))
    assert not reader.allows("svc", canonical_scopes("read write", ["read"]))
    assert not reader.allows("svc", canonical_scopes("", []))
    assert anything.allows("svc", canonical_scopes("", []))
