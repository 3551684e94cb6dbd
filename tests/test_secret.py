"""Secret and Token never show their values: repr, str, format, pickling, pydantic."""

from __future__ import annotations

import copy
import hmac
import logging
import pickle
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from tokenbroker.core.secret import REDACTED, Secret
from tokenbroker.core.token import Token

CANARY = "CANARY_SECRET_7f3c9a1e"
AT_CANARY = "CANARY_AT_0b5d2e8f"


class Holder(BaseModel):
    """A model with a Secret field, like the config models."""

    name: str
    secret: Secret
    optional: Secret | None = None


def test_repr_and_str_are_redacted() -> None:
    """repr() and str() show the redaction marker, never the value."""
    secret = Secret(CANARY)
    assert repr(secret) == f"Secret({REDACTED!r})"
    assert str(secret) == REDACTED
    assert CANARY not in repr(secret)
    assert CANARY not in str(secret)


@pytest.mark.parametrize(
    "render",
    [
        lambda s: f"{s}",
        lambda s: f"{s!s}",
        lambda s: f"{s!r}",
        lambda s: f"{s:>40}",
        lambda s: f"{s:s}",
        lambda s: "{}".format(s),  # noqa: UP032 - str.format is what we test here
        lambda s: "%s" % s,  # noqa: UP031 - %-formatting is what we test here
        lambda s: "%r" % (s,),  # noqa: UP031
        lambda s: repr([s, {"k": s}]),
        lambda s: str((s,)),
    ],
)
def test_every_formatting_path_is_redacted(render: Any) -> None:
    """f-strings, format specs, str.format, %-formatting and containers never show the value."""
    text = render(Secret(CANARY))
    assert CANARY not in text
    assert REDACTED in text


def test_logging_a_secret_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """A secret passed as a logging argument is rendered redacted in the record."""
    with caplog.at_level(logging.DEBUG, logger="tokenbroker.test"):
        logging.getLogger("tokenbroker.test").debug("value=%s %r", Secret(CANARY), Secret(CANARY))
    assert caplog.records
    assert CANARY not in caplog.text
    assert REDACTED in caplog.text


def test_reveal_returns_the_value() -> None:
    """reveal() is the one way to get the value back, unchanged."""
    value = "s:e%c+r et é\x00"
    assert Secret(value).reveal() == value


def test_only_strings_are_accepted() -> None:
    """Wrapping a non-string raises TypeError instead of silently stringifying it."""
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Secret(None)  # type: ignore[arg-type]


def test_truthiness_and_length_follow_the_value() -> None:
    """bool() and len() reflect the wrapped value (an empty secret is falsy)."""
    assert not Secret("")
    assert Secret("x")
    assert len(Secret("abcd")) == 4


def test_equality_compares_values() -> None:
    """Two secrets with the same value are equal; different values, or a plain str, are not."""
    assert Secret("same-é") == Secret("same-é")
    assert Secret("same") != Secret("other")
    assert Secret("same") != Secret("same ")
    assert Secret("same") != "same"
    assert Secret("same") != "same"


def test_equality_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equality goes through hmac.compare_digest on the encoded values (constant time)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert Secret("abc") == Secret("abc")
    assert Secret("abc") != Secret("abd")
    assert calls == [(b"abc", b"abc"), (b"abc", b"abd")]


def test_secret_is_unhashable() -> None:
    """A secret cannot be hashed, so it can never become a dict or cache key."""
    with pytest.raises(TypeError):
        hash(Secret(CANARY))
    with pytest.raises(TypeError):
        _ = {Secret(CANARY): 1}
    with pytest.raises(TypeError):
        _ = {Secret(CANARY)}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_secret_cannot_be_pickled(protocol: int) -> None:
    """Pickling a secret (alone or inside a container) raises TypeError at every protocol."""
    with pytest.raises(TypeError):
        pickle.dumps(Secret(CANARY), protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [Secret(CANARY)]}, protocol=protocol)


def test_secret_cannot_be_copied_through_reduce() -> None:
    """copy.copy/deepcopy go through __reduce__ and are refused too."""
    with pytest.raises(TypeError):
        copy.copy(Secret(CANARY))
    with pytest.raises(TypeError):
        copy.deepcopy(Secret(CANARY))


def test_secret_has_no_instance_dict() -> None:
    """Secret uses __slots__: no __dict__ that vars() or a debugger dump would show."""
    assert not hasattr(Secret(CANARY), "__dict__")


def test_pydantic_field_validates_from_str_and_from_secret() -> None:
    """A Secret field accepts a plain string or an existing Secret and keeps the value."""
    from_str = Holder(name="a", secret=CANARY)
    existing = Secret(CANARY)
    from_secret = Holder(name="a", secret=existing)
    assert isinstance(from_str.secret, Secret)
    assert from_str.secret.reveal() == CANARY
    assert from_secret.secret is existing
    assert from_str.optional is None


def test_pydantic_field_rejects_non_strings_without_echoing() -> None:
    """A non-string input is a validation error whose message does not carry the value."""
    with pytest.raises(ValidationError) as info:
        Holder(name="a", secret=[CANARY])
    assert CANARY not in str(info.value.errors(include_input=False))


def test_pydantic_dump_is_redacted() -> None:
    """model_dump, model_dump_json and repr of a model show the marker, never the value."""
    model = Holder(name="a", secret=Secret(CANARY), optional=Secret(CANARY + "2"))
    dumped = model.model_dump()
    assert dumped == {"name": "a", "secret": REDACTED, "optional": REDACTED}
    assert model.model_dump(mode="json") == dumped
    as_json = model.model_dump_json()
    assert CANARY not in as_json
    assert as_json.count(REDACTED) == 2
    assert CANARY not in repr(model)
    assert CANARY not in str(model)


def test_pydantic_round_trip_stays_redacted() -> None:
    """Re-validating a dump yields the marker, so a dump can never restore the real value."""
    model = Holder(name="a", secret=Secret(CANARY))
    again = Holder.model_validate_json(model.model_dump_json())
    assert again.secret.reveal() == REDACTED
    assert again.secret != model.secret


def make_token() -> Token:
    """A token carrying the access-token canary."""
    return Token(access_token=AT_CANARY, token_type="Bearer", expires_at=2e9, scope="read")


def test_token_repr_never_shows_the_access_token() -> None:
    """Token repr/str/f-string show type, expiry and scope but not the access token."""
    token = make_token()
    for text in (repr(token), str(token), f"{token}", "%s" % (token,), repr([token])):  # noqa: UP031
        assert AT_CANARY not in text
        assert "Bearer" in text
        assert "read" in text
        assert REDACTED in text


def test_token_authorization_header_uses_the_value() -> None:
    """The token still gives consumers the real value where it is meant to be sent."""
    token = make_token()
    assert token.access_token == AT_CANARY
    assert token.authorization == f"Bearer {AT_CANARY}"


def test_token_expires_in_is_never_negative() -> None:
    """expires_in counts down to zero and never goes negative for an expired token."""
    expired = Token(access_token="a", token_type="Bearer", expires_at=1.0)
    assert expired.expires_in == 0
    assert make_token().expires_in > 0
