"""config.example.yaml lists every field of the configuration models, under its own section,
and its uncommented part is a valid configuration."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from tokenbroker import parse_settings
from tokenbroker.config.sections import Settings

EXAMPLE = Path(__file__).parent.parent / "config.example.yaml"


def _models(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted field path of ``model``, nested models and provider kinds included."""
    found: set[str] = set()
    for name, field in model.model_fields.items():
        found.add(prefix + name)
        for inner in _models(field.annotation):
            found |= _fields(inner, f"{prefix}{name}.")
    return found


def _sections(text: str) -> dict[str, str]:
    """The example's text per top-level section (commented or not)."""
    parts = re.split(r"(?m)^#? ?([a-z_]+):", text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_field_is_in_the_example() -> None:
    """Each field path of Settings (generated from the models) has its last name as a key
    in its top-level section of config.example.yaml."""
    sections = _sections(EXAMPLE.read_text())
    missing = []
    for path in sorted(_fields(Settings)):
        top, *rest = path.split(".")
        if top not in sections:
            missing.append(path)
            continue
        leaf = rest[-1] if rest else None
        if leaf and not re.search(rf"(?m)^[#\s-]*{leaf}(?::|\s/)|[ /]{leaf} /", sections[top]):
            missing.append(path)
    assert missing == []


def test_the_uncommented_example_is_valid() -> None:
    """The example's active lines load as settings, with its variables set."""
    variables = {
        "TOKENBROKER_KEY": "A" * 43 + "=",
        "TDX_CLIENT_ID": "id",
        "TDX_CLIENT_SECRET": "secret",
        "TESLA_CLIENT_ID": "id",
        "TESLA_REFRESH_TOKEN": "rt",
        "ALICE_PASSWORD": "pw",
    }
    settings = parse_settings(EXAMPLE.read_text(), variables)
    assert set(settings.providers) == {"tdx", "tesla", "dolphindb"}
