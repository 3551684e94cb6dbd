"""Grant kinds: the credential fingerprint stays byte-identical, and every settings field is classified."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, get_args

import pytest
import yaml

from tokenbroker.config import Provider, Settings, parse_settings
from tokenbroker.core.scopes import canonical_scopes
from tokenbroker.engine.credentials import credential_row
from tokenbroker.engine.refresher import fingerprint
from tokenbroker.grants import KINDS, GrantKind, kind_of
from tokenbroker.grants.kinds import LoginKind

#: Sample providers; the digests below were computed with the code before grant kinds
#: (``getattr`` on the settings), so stored rows keep their ids across the upgrade.
SAMPLE: dict[str, Any] = {
    "store": "memory",
    "providers": {
        "tdx": {
            "grant": "client_credentials",
            "token_url": "https://idp.example/token",
            "client_id": "tdx-client",
            "client_secret": "s3cret",
            "scopes": ["read"],
        },
        "aud": {
            "grant": "client_credentials",
            "token_url": "https://idp.example/token",
            "client_id": "c2",
            "client_secret": "x",
            "client_auth": "client_secret_post",
            "scopes": ["write", "read"],
            "audience": "https://api.example",
        },
        "tesla": {
            "grant": "refresh_token",
            "token_url": "https://auth.example/oauth2/v3/token",
            "client_id": "tesla-client",
            "refresh_token": "rt-seed",
            "scopes": ["openid", "offline_access"],
            "rotation": {"single_use": True, "reuse_grace_seconds": 86400},
        },
        "db": {
            "grant": "login",
            "login_url": "http://db.example:8848/api/login",
            "token_path": "data.token",
            "credentials": [
                {"username": "alice", "password": "pw1"},
                {"username": "bob", "password": "pw2"},
            ],
        },
    },
}

PINNED = [
    ("tdx", ("read",), None, ("tdx:4aeb33b0bc909ff0", "4aeb33b0bc909ff0")),
    ("tdx", (), None, ("tdx:e8529f15060633b6", "e8529f15060633b6")),
    ("tdx", ("read", "write"), None, ("tdx:b3ec15d605b9d5f6", "b3ec15d605b9d5f6")),
    ("aud", ("read", "write"), None, ("aud:c9793ef54cddaded", "c9793ef54cddaded")),
    ("tesla", ("offline_access", "openid"), None, ("tesla", "011370d8a88cc29f")),
    ("db", (), "alice", ("db:a24a61f2ab88e342", "a24a61f2ab88e342")),
    ("db", (), "bob", ("db:a8033ef23ae76753", "a8033ef23ae76753")),
]


def sample(**changes: dict[str, Any]) -> Settings:
    """The sample settings, with some providers' fields changed."""
    providers = {
        name: {**spec, **changes.get(name, {})} for name, spec in SAMPLE["providers"].items()
    }
    return parse_settings(yaml.safe_dump({**SAMPLE, "providers": providers}), {})


@pytest.mark.parametrize(("name", "scopes", "account", "expected"), PINNED)
def test_credential_row_is_byte_identical_to_before_grant_kinds(
    name: str, scopes: tuple[str, ...], account: str | None, expected: tuple[str, str]
) -> None:
    """Row ids and digests of existing configs are exactly those the pre-kinds code computed."""
    settings = sample()
    assert credential_row(name, settings.providers[name], scopes, account) == expected


@pytest.mark.parametrize("kind", KINDS.values(), ids=lambda kind: kind.grant)
def test_every_settings_field_is_identity_keyed_or_excluded(kind: GrantKind[Any]) -> None:
    """Each field of a provider settings model is in exactly one of identity, keyed or excluded."""
    fields = set(kind.settings_type.model_fields)
    identity, keyed, excluded = (
        set(kind.identity_fields),
        set(kind.keyed_fields),
        set(kind.excluded_fields),
    )
    unclassified = fields - (identity | keyed | excluded)
    assert unclassified == set()
    assert (identity | keyed | excluded) - fields == set()  # no classified field the model lacks
    assert not identity & keyed and not identity & excluded and not keyed & excluded
    assert all(kind.excluded_fields.values()), "every exclusion states its reason"


def test_every_provider_type_has_its_kind() -> None:
    """The registry has one kind per member of the Provider union, keyed by its discriminator."""
    union = get_args(get_args(Provider)[0])
    assert {kind.settings_type for kind in KINDS.values()} == set(union)
    for grant, kind in KINDS.items():
        assert kind.settings_type.model_fields["grant"].annotation == Literal[grant]


def configured_row(settings: Settings, name: str) -> str:
    """The row id of a provider's configured key (its configured scopes, or its first account)."""
    spec = settings.providers[name]
    kind = kind_of(spec)
    accounts = kind.accounts(spec)
    scopes = () if accounts else canonical_scopes(None, kind.scopes(spec))
    return credential_row(name, spec, scopes, accounts[0] if accounts else None)[0]


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("tdx", {"token_url": "https://other.example/token"}),
        ("tdx", {"client_id": "someone-else"}),
        ("tdx", {"audience": "https://api.example"}),
        ("tdx", {"scopes": ["write"]}),
        ("db", {"login_url": "http://db.example:8849/api/login"}),
        ("db", {"credentials": [{"username": "carol", "password": "pw1"}]}),
    ],
)
def test_identity_change_starts_a_new_row(name: str, change: dict[str, Any]) -> None:
    """Changing an identity field of the configured key gives the credential a new row id."""
    assert configured_row(sample(), name) != configured_row(sample(**{name: change}), name)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("tdx", {"client_secret": "rotated-secret", "timeout_seconds": 3, "retries": 5}),
        ("tdx", {"client_auth": "client_secret_post", "max_scopes": 2, "required": True}),
        ("db", {"ttl_seconds": 60, "token_path": "token", "token_type": "Token"}),
        ("tesla", {"token_url": "https://elsewhere.example/token", "client_id": "other"}),
    ],
)
def test_excluded_change_or_rotating_credential_keeps_the_row(
    name: str, change: dict[str, Any]
) -> None:
    """Excluded fields leave the row id alone; a refresh-token credential's row survives any change."""
    assert configured_row(sample(), name) == configured_row(sample(**{name: change}), name)


def test_accounts_are_the_login_usernames_in_order() -> None:
    """Only a login provider has accounts: its usernames, in configured order, no passwords."""
    settings = sample()
    assert kind_of(settings.providers["db"]).accounts(settings.providers["db"]) == ("alice", "bob")
    for name in ("tdx", "tesla"):
        assert kind_of(settings.providers[name]).accounts(settings.providers[name]) == ()


def test_identity_holds_no_secret() -> None:
    """No client secret, refresh token or password appears in any identity."""
    settings = sample()
    for name, scopes, account, _ in PINNED:
        spec = settings.providers[name]
        text = repr(kind_of(spec).identity(spec, scopes, account))
        for secret in ("s3cret", "rt-seed", "pw1", "pw2"):
            assert secret not in text


def test_a_new_identity_field_leaves_fingerprints_alone_until_set() -> None:
    """An identity field added later enters the fingerprint only when set, so old rows keep their ids."""

    class WiderLogin(LoginKind):
        identity_fields: ClassVar[Mapping[str, str]] = {
            **LoginKind.identity_fields,
            "expires_in_path": "expires_in_path",
        }

    unset, set_ = sample(), sample(db={"expires_in_path": "data.ttl"})
    identity = WiderLogin().identity(unset.providers["db"], (), "alice")
    assert "expires_in_path" not in identity
    assert fingerprint(identity) == "a24a61f2ab88e342"
    changed = WiderLogin().identity(set_.providers["db"], (), "alice")
    assert changed["expires_in_path"] == "data.ttl"
