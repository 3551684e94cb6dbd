"""One name pattern: the config and allow rules accept exactly the names tokenbroker.names does."""

from __future__ import annotations

import pytest
import yaml

from tokenbroker.config import parse_settings
from tokenbroker.core.names import CONSUMER_NAME, PROVIDER_NAME
from tokenbroker.core.rules import parse_rule
from tokenbroker.errors import ConfigError

NAMES = ["tdx", "a", "db-1", "x_y", "0", "a" * 64, "a" * 65, "Tdx", "-a", "_a", "a.b", "a b", ""]


def config_accepts_provider(name: str) -> bool:
    """Whether a config with a provider of this name validates."""
    provider = {
        "grant": "client_credentials",
        "token_url": "https://idp.example/t",
        "client_id": "c",
    }
    provider["client_auth"] = "none"
    try:
        parse_settings(yaml.safe_dump({"providers": {name: provider}}), {})
    except ConfigError:
        return False
    return True


def rule_accepts(name: str) -> bool:
    """Whether an allow rule naming this provider parses."""
    try:
        return parse_rule(f"{name}:read").provider == name
    except ValueError:
        return False


@pytest.mark.parametrize("name", NAMES)
def test_provider_name_accepted_alike_everywhere(name: str) -> None:
    """The config and allow rules accept exactly the provider names of the shared pattern."""
    expected = PROVIDER_NAME.match(name) is not None
    assert config_accepts_provider(name) is expected
    assert rule_accepts(name) is expected


@pytest.mark.parametrize("name", [*NAMES, "Etl.Job", ".a"])
def test_consumer_name_config_and_pattern_agree(name: str) -> None:
    """The config accepts exactly the consumer names the shared pattern (used by the CLI) accepts."""
    consumer = {"api_key_sha256": "0" * 64, "allow": ["tdx"]}
    try:
        parse_settings(yaml.safe_dump({"consumers": {name: consumer}}), {})
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted is (CONSUMER_NAME.match(name) is not None)
