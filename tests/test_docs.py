"""The documents a newcomer follows: docs/tutorial.md is run as written against the bundled
server, and the README's command list and quick start match what the code offers."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from support import Lines, free_port, terminate
from tokenbroker.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
README = ROOT / "README.md"
#: The port the tutorial runs the bundled server on; the test swaps in a free one.
TUTORIAL_PORT = "9400"
SECRET_PLACEHOLDER = "paste-the-client_secret-here"


@dataclass
class Block:
    """One fenced block: its info string, its text, and the file it is (``<!-- file: … -->``)."""

    info: str
    text: str
    file: str | None


def blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of ``markdown`` in order."""
    found = []
    pattern = re.compile(r"(?:<!-- file: (\S+) -->\n)?```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
    for match in pattern.finditer(markdown):
        found.append(Block(match.group(2), match.group(3), match.group(1)))
    return found


def commands(block: Block) -> Iterator[tuple[str, list[str]]]:
    """Each ``$ command`` of a console block with the output lines shown under it."""
    command: str | None = None
    output: list[str] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            if command is not None:
                yield command, output
            command, output = line[2:], []
        else:
            output.append(line)
    if command is not None:
        yield command, output


def matches(expected: list[str], actual: list[str]) -> bool:
    """``actual`` is ``expected`` line for line, where ``…`` stands for any text."""
    if len(expected) != len(actual):
        return False
    return all(
        re.fullmatch(".+".join(map(re.escape, want.split("…"))), got)
        for want, got in zip(expected, actual, strict=True)
    )


def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    """Every file and console command of docs/tutorial.md, in order, against the bundled server
    started as the tutorial starts it, prints what the tutorial shows (``…`` for a secret)."""
    port = str(free_port())
    text = TUTORIAL.read_text(encoding="utf-8").replace(TUTORIAL_PORT, port)
    bin_dir = Path(sys.executable).parent  # as after `source .venv/bin/activate`
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TDX_", "TOKENBROKER_")) and key != "VIRTUAL_ENV"
    }
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    server: subprocess.Popen[str] | None = None
    secret: str | None = None
    ran = 0
    try:
        for block in blocks(text):
            if block.file is not None:
                content = block.text
                if block.file == ".env":
                    assert SECRET_PLACEHOLDER in content and secret is not None
                    content = content.replace(SECRET_PLACEHOLDER, secret)
                (tmp_path / block.file).write_text(content, encoding="utf-8")
            if block.info != "console":
                continue
            for command, expected in commands(block):
                if command.startswith("python -m tokenbroker.testing"):
                    argv = shlex.split(command)
                    argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
                    server = subprocess.Popen(
                        argv,
                        cwd=tmp_path,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        stdin=subprocess.DEVNULL,
                        text=True,
                    )
                    out = Lines(server.stdout)
                    out.until("Ctrl-C to stop")
                    shown = out.seen[: len(expected)]
                    assert matches(expected, shown), (expected, shown)
                    secret = next(line.split()[-1] for line in out.seen if "client_secret:" in line)
                else:
                    done = subprocess.run(
                        ["bash", "-c", command],
                        check=False,  # the error examples exit non-zero on purpose
                        cwd=tmp_path,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        text=True,
                        timeout=60,
                    )
                    shown = done.stdout.splitlines()
                    assert matches(expected, shown), (command, expected, shown)
                ran += 1
    finally:
        if server is not None:
            terminate(server)
    assert server is not None, "the tutorial never starts the bundled server"
    assert ran >= 8  # the server, check, token, curl, three scripts, three errors
    python_files = {block.file for block in blocks(text) if block.info == "python"}
    assert python_files == {"fetch.py", "call_api.py", "errors.py"}
    assert all(f"$ python {name}" in text for name in python_files)  # each script is run


def cli_commands(group: click.Group, prefix: str = "tokenbroker") -> list[str]:
    """Every command of ``group`` as typed (``tokenbroker consumers add``), groups expanded."""
    found = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += cli_commands(command, f"{prefix} {name}")
        else:
            found.append(f"{prefix} {name}")
    return found


def readme_section(title: str) -> str:
    """The text of the README section headed ``## title`` (up to the next ``## ``)."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_the_command_line_section_lists_every_command_once() -> None:
    """The README's "Command line" block has one line per command `tokenbroker --help` (and
    each group's help) offers, no more, and each `token` flag."""
    listed: list[str] = []
    section = readme_section("Command line")
    block = next(b for b in blocks(section) if b.info == "sh")
    for line in block.text.splitlines():
        words = line.split("#")[0].split()
        if words and words[0] == "tokenbroker":
            command = words[:2]
            if len(words) > 2 and f"tokenbroker {words[1]} {words[2]}" in cli_commands(main):
                command = words[:3]
            listed.append(" ".join(command))
    assert sorted(listed) == cli_commands(main)
    token = main.commands["token"]
    for option in token.params:  # --config is said once for every command, under the block
        if isinstance(option, click.Option) and "--config" not in option.opts:
            assert any(flag in block.text for flag in option.opts), option.opts
    assert "`--config FILE`" in section


def test_the_quick_start_names_prerequisites_and_how_to_reach_the_commands() -> None:
    """The quick start names Python ≥ 3.11, the C compiler and headers the compiled run needs
    (and how to skip it), and how to run the CLI after `make` (.venv/bin or activate)."""
    quick = readme_section("Quick start")
    assert "Python 3.11" in quick
    assert "C compiler" in quick and "headers" in quick
    assert "make lint typecheck pytest" in quick  # the suite without the compiled run
    assert "source .venv/bin/activate" in quick and ".venv/bin/tokenbroker" in quick
    assert "docs/tutorial.md" in quick


def test_the_configuration_section_documents_inline_login_credentials() -> None:
    """The Configuration section shows a login provider's inline ``credentials:`` list of
    ``{username, password}`` entries, the form `python -m tokenbroker.testing` prints."""
    section = readme_section("Configuration")
    assert "credentials:" in section
    assert re.search(r"- \{username: \w+, password: ", section)


#: The five systems tokenbroker replaces, each with its own README migration section.
MIGRATIONS = (
    "### Migrating from the TDX token script",
    "### Migrating from tpp (the token-pool proxy)",
    "### Migrating from the MC service-token and delegated-download client",
    "### Migrating from the TrailTag job API",
    "### Migrating from the Tesla token owner (`/get-token`)",
)


def test_the_readme_has_a_migration_section_per_original_system() -> None:
    """The README's "Migrating from …" section has one subsection per original system, each
    once (none left elsewhere), with the tpp metric mapping table and the import command."""
    section = readme_section("Migrating from the systems tokenbroker replaces")
    text = README.read_text()
    for heading in MIGRATIONS:
        assert section.count(heading + "\n") == 1, heading
        assert text.count(heading + "\n") == 1, heading
    assert text.count("### Migrating from") == len(MIGRATIONS)
    for name in ("tpp_tokens_total", "tpp_tokens_in_use", "tpp_tokens_available"):
        assert f"| `{name}` | `tokenbroker_pool_tokens" in section
    assert "| `tpp_requests_waiting` | `tokenbroker_pool_waiting{route}` |" in section
    assert "tokenbroker import tpp" in section
