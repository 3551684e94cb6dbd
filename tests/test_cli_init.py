"""tokenbroker init: a starter config, a new key in a 0600 .env, a .env.example; check passes
on them; nothing is overwritten without --force; the key is never printed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from tokenbroker.cli.main import main
from tokenbroker.core.crypto import decode_key


def test_check_passes_on_what_init_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """init writes tokenbroker.yaml, .env (mode 0600, one valid key, never printed) and
    .env.example; tokenbroker check on that config answers ok."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOKENBROKER_KEY", raising=False)
    monkeypatch.delenv("TOKENBROKER_CONFIG", raising=False)
    runner = CliRunner()
    wrote = runner.invoke(main, ["init"])
    assert wrote.exit_code == 0, wrote.output
    env = tmp_path / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    name, _, key = env.read_text().strip().partition("=")
    assert name == "TOKENBROKER_KEY"
    assert len(decode_key(key)) == 32
    assert key not in wrote.output
    assert "TOKENBROKER_KEY=\n" in (tmp_path / ".env.example").read_text()
    checked = runner.invoke(main, ["check", "--config", "tokenbroker.yaml"])
    assert checked.exit_code == 0, checked.output
    assert "tokenbroker.yaml: ok" in checked.output
    assert key not in checked.output


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    """A second init leaves every file as it was and exits non-zero naming them; --force
    writes a new key."""
    runner = CliRunner()
    assert runner.invoke(main, ["init", str(tmp_path)]).exit_code == 0
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    (tmp_path / "tokenbroker.yaml").write_text("# mine\n")
    again = runner.invoke(main, ["init", str(tmp_path)])
    assert again.exit_code != 0
    assert "already exist" in again.output and ".env" in again.output
    assert (tmp_path / "tokenbroker.yaml").read_text() == "# mine\n"
    assert (tmp_path / ".env").read_text() == before[".env"]
    forced = runner.invoke(main, ["init", "--force", str(tmp_path)])
    assert forced.exit_code == 0
    assert (tmp_path / ".env").read_text() != before[".env"]
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600


def test_init_creates_a_missing_directory(tmp_path: Path) -> None:
    """init into a directory that does not exist yet creates it with the three files."""
    target = tmp_path / "new" / "conf"
    assert CliRunner().invoke(main, ["init", str(target)]).exit_code == 0
    assert sorted(p.name for p in target.iterdir()) == [".env", ".env.example", "tokenbroker.yaml"]
