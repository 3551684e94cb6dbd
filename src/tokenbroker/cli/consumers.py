"""``tokenbroker consumers add|list|remove``: consumer API keys in the store.

A key is printed once, when it is made; the store keeps only its SHA-256 digest. A running
``serve`` or ``proxy`` follows the stored consumers, so a change takes effect without restart.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..config import Settings, load_settings
from ..core.names import CONSUMER_NAME
from ..core.rules import parse_rule, subject_entry
from ..engine.consumers import hash_key, new_key
from ..errors import TokenBrokerError
from .command import config_option, fail, open_store

__all__ = ["consumers"]


@click.group("consumers")
def consumers() -> None:
    """Manage consumer API keys (stored as SHA-256 digests only)."""


@consumers.command("add")
@click.argument("name")
@click.option(
    "--allow",
    "rules",
    multiple=True,
    required=True,
    help="PROVIDER, PROVIDER:SCOPE, delegate:PROVIDER or delegate-as:PROVIDER (repeatable).",
)
@click.option(
    "--subject",
    default=None,
    help="The subject (sub) of its delegated tokens; default: NAME.",
)
@config_option
def consumers_add(
    name: str, rules: tuple[str, ...], subject: str | None, config_path: Path
) -> None:
    """Create a consumer; its key is printed once, alone on the last line."""
    try:
        parsed = [parse_rule(rule) for rule in rules]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--allow") from None
    if not CONSUMER_NAME.match(name):
        raise click.BadParameter("1-64 letters, digits, '_', '.', '-'", param_hint="NAME")
    entries = [str(rule) for rule in parsed]
    if subject is not None:
        try:
            entries.append(subject_entry(subject))
        except TokenBrokerError as exc:
            raise click.BadParameter(str(exc), param_hint="--subject") from None
    key = new_key()
    try:
        settings = load_settings(config_path)
        store = open_store(config_path, settings)
        try:
            store.add_consumer(name, hash_key(key), entries)
        finally:
            store.close()
        _announce(settings)
    except TokenBrokerError as exc:
        fail(exc)
    click.echo(f"consumer {name} may use: {', '.join(str(r) for r in parsed)}", err=True)
    click.echo("the key is shown once; only its SHA-256 is stored:", err=True)
    click.echo(key)


@consumers.command("list")
@config_option
def consumers_list(config_path: Path) -> None:
    """List consumers (names and rules, never keys)."""
    try:
        settings = load_settings(config_path)
        store = open_store(config_path)
        try:
            stored = store.consumers()
        finally:
            store.close()
    except TokenBrokerError as exc:
        fail(exc)
    for name, spec in sorted(settings.consumers.items()):
        shown = [*spec.allow, *([subject_entry(spec.subject)] if spec.subject else [])]
        click.echo(f"{name}\tconfig\t{', '.join(shown)}")
    for name, _, rules in stored:
        click.echo(f"{name}\tstore\t{', '.join(rules)}")


@consumers.command("remove")
@click.argument("name")
@config_option
def consumers_remove(name: str, config_path: Path) -> None:
    """Delete a stored consumer; its key stops working."""
    try:
        settings = load_settings(config_path)
        store = open_store(config_path, settings)
        try:
            removed = store.remove_consumer(name)
        finally:
            store.close()
        _announce(settings)
    except TokenBrokerError as exc:
        fail(exc)
    if not removed:
        click.echo(f"error: no stored consumer named {name!r}", err=True)
        raise SystemExit(3)
    click.echo(f"removed {name}")


def _announce(settings: Settings) -> None:
    """Tell running brokers at once (cluster mode) that the stored consumers changed; without
    Redis, or when it does not answer, they notice within their poll (half a second)."""
    if settings.redis is None:
        return
    from ..cluster import announce  # noqa: PLC0415 - only in cluster mode
    from ..engine.coordination import CONSUMERS  # noqa: PLC0415

    announce(settings.redis, settings.store, CONSUMERS)
