"""``.env.example``: it names every variable the README's configuration reads, empty."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_names_every_variable_of_the_readme_config_with_empty_values() -> None:
    """Each ``${VAR}`` of the README's Configuration block (and TOKENBROKER_CONFIG) has a line
    ``VAR=`` in .env.example, every assignment there is empty, and each is used somewhere."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml", 1)[1].split("```", 1)[0]
    wanted = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::-[^}]*)?\}", block)) | {"TOKENBROKER_CONFIG"}
    lines = (ROOT / ".env.example").read_text().splitlines()
    assignments = [line for line in lines if line and not line.startswith("#")]
    names = [line.split("=", 1)[0] for line in assignments]
    assert {"TOKENBROKER_KEY", "FILES_CLIENT_SECRET"} <= wanted
    assert set(names) == wanted
    assert len(names) == len(set(names))
    assert all(line.endswith("=") for line in assignments), assignments
