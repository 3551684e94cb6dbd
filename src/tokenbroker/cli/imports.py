"""``tokenbroker import tpp``: write the tokenbroker configuration equivalent to another
system's (today tpp's ``config.yaml``, translated by :mod:`tokenbroker.config.tpp`).

The written file holds no secret: the account's password is read from
``${TPP_CREDENTIAL_PASSWORD}`` and the store key from ``${TOKENBROKER_KEY}``; both go into
``.env`` beside the written file (mode 0600) when it does not define them yet — the password
only when the tpp file held one. Every tpp key that has no equivalent is printed, one line
each. The result is validated as ``tokenbroker check`` would before anything is written; an
existing output file is never overwritten without ``--force``.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import yaml

from ..config import parse_settings
from ..config.tpp import PASSWORD_VAR, translate_tpp
from ..core.crypto import generate_key
from ..errors import ConfigError
from .command import fail
from .init import write_private

__all__ = ["import_group"]

_HEADER = """\
# tokenbroker configuration imported from tpp's {source} by `tokenbroker import tpp`.
# ${{VAR}} values come from the environment, then from .env beside this file.
# Every field, its default and what it does: config.example.yaml in the repository.
"""


@click.group("import")
def import_group() -> None:
    """Write a tokenbroker configuration from another system's."""


def _env_lines(path: Path) -> dict[str, str]:
    """The variables ``path`` (a ``.env``) defines, by name (values are not interpreted)."""
    found: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            name, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                found[name.strip().removeprefix("export ").strip()] = value
    return found


@import_group.command("tpp")
@click.argument("source", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("tokenbroker.yaml"),
    show_default=True,
    help="Where to write the tokenbroker configuration (.env goes beside it).",
)
@click.option("--force", is_flag=True, help="Overwrite the output file.")
def import_tpp(source: Path, output: Path, force: bool) -> None:
    """Write the tokenbroker.yaml equivalent to tpp's SOURCE config.yaml (a login provider,
    its pool route, the proxy's ports, metrics_compat: tpp) and print each tpp key it could
    not map. Secrets go to .env, never into the written file or the output."""
    if output.exists() and not force:
        raise click.ClickException(f"{output} already exists: nothing written (--force)")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise click.ClickException(
            f"{source}: cannot read it as YAML ({type(exc).__name__})"
        ) from None
    imported = translate_tpp(data)
    if imported.problems:
        for problem in imported.problems:
            click.echo(f"error: {source}: {problem}", err=True)
        raise SystemExit(2)
    env_file = output.parent / ".env"
    existing = _env_lines(env_file)
    additions = {name: value for name, value in imported.env.items() if name not in existing}
    if "TOKENBROKER_KEY" not in existing and "TOKENBROKER_KEY" not in os.environ:
        additions["TOKENBROKER_KEY"] = generate_key()
    text = _HEADER.format(source=source.name) + yaml.safe_dump(
        imported.config, sort_keys=False, default_flow_style=False
    )
    env = {**existing, **additions, **os.environ}
    env.setdefault(PASSWORD_VAR, "set-me")  # validated for shape only; it is never written
    try:
        parse_settings(text, env, base_dir=output.parent)
    except ConfigError as exc:
        fail(exc)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    if additions:
        before = env_file.read_text(encoding="utf-8") if env_file.exists() else ""
        if before and not before.endswith("\n"):
            before += "\n"
        write_private(env_file, before + "".join(f"{k}={v}\n" for k, v in additions.items()))
    click.echo(f"wrote {output}")
    for name in additions:
        click.echo(f"wrote {name} to {env_file} (mode 0600)")
    if not ({PASSWORD_VAR} & (imported.env.keys() | existing.keys() | os.environ.keys())):
        click.echo(f"set {PASSWORD_VAR} (the account's password) in the environment or .env")
    for line in imported.unmapped:
        click.echo(f"not mapped: {line}")
    click.echo(f"next: tokenbroker check --config {output}")
