"""Grant kinds: the credential fingerprint stays byte-identical, and every settings field is classified."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tokenbroker.broker import credential_row
from tokenbroker.config import Settings, parse_settings

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
