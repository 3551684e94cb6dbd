"""``tokenbroker check``, ``status`` and ``token``: what the broker would do and has done.

``check`` validates the configuration and reads the store, ``status`` prints one line per
stored credential, and ``token`` prints one access token for a shell script. None of them
ever prints a secret other than the token ``token`` was asked for.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..config import ProxySettings, config_warnings, load_settings, startup_problems
from ..core.crypto import Keyring
from ..engine.broker import Broker
from ..engine.credentials import credential_label
from ..errors import ConfigError, StoreError, TokenBrokerError
from ..store import probe
from .command import config_option, fail, open_store
from .store import schema_line, schema_state

__all__ = ["check", "status", "token"]


@click.command("check")
@config_option
def check(config_path: Path) -> None:
    """Validate the configuration and the store; name every problem, never print a secret.

    Settings nothing reads yet are warnings. The store is only read, never created or migrated;
    the last line says whether its schema is current.
    """
    try:
        settings = load_settings(config_path)
        for warning in config_warnings(settings, config_path):
            click.echo(f"warning: {warning}", err=True)
        problems = startup_problems(settings)
        keys = settings.encryption_keys
        problems += probe(settings.store, Keyring(keys) if keys else None)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        fail(exc)
    names = ", ".join(sorted(settings.providers)) or "none"
    click.echo(f"{config_path}: ok ({len(settings.providers)} providers: {names})")
    try:
        click.echo(schema_line(schema_state(settings.store)))
    except StoreError as exc:  # gone since the probe: say so, the config itself is fine
        click.echo(f"warning: {exc}", err=True)
    if settings.proxy is not None:
        for line in _proxy_limits(settings.proxy):
            click.echo(line)


def _proxy_limits(proxy: ProxySettings) -> list[str]:
    """The client and lease limits the proxy applies, defaults included (``check``)."""
    names = (
        "client_header_timeout_seconds",
        "client_body_timeout_seconds",
        "client_request_timeout_seconds",
        "client_send_timeout_seconds",
    )
    lines = ["proxy: " + " ".join(f"{name}={getattr(proxy, name):g}" for name in names)]
    for i, route in enumerate(proxy.routes):
        if route.mode == "pool":
            age = "none" if route.max_lease_seconds is None else f"{route.max_lease_seconds:g}"
            lines.append(
                f"proxy.routes.{i} ({route.prefix} -> {route.provider}, pool): "
                f"wait_timeout_seconds={route.wait_timeout_seconds:g} "
                f"idle_timeout_seconds={route.idle_timeout_seconds:g} max_lease_seconds={age}"
            )
    return lines


@click.command("token")
@click.argument("provider")
@click.option("--scope", default=None, help="Space-separated scopes.")
@click.option("--account", default=None, help="Account of a login provider.")
@config_option
def token(provider: str, scope: str | None, account: str | None, config_path: Path) -> None:
    """Print an access token for PROVIDER (for shell scripts)."""
    try:
        with Broker.from_config(config_path) as broker:
            value = broker.get_token(provider, scope, account=account)
    except TokenBrokerError as exc:
        fail(exc)
    click.echo(value.access_token)


@click.command("status")
@config_option
def status(config_path: Path) -> None:
    """One line per stored credential: provider, scope, account, state, valid until and last
    refresh (UTC), and a failing credential's last error (class, HTTP status, OAuth code)."""
    try:
        settings = load_settings(config_path)
        store = open_store(config_path, settings)
    except TokenBrokerError as exc:
        fail(exc)
    try:
        now = store.now()
        rows = store.states()
    finally:
        store.close()
    if not rows:
        click.echo("no stored credentials yet")
        return
    table = []
    for row in rows:
        scope, account = credential_label(
            settings, row["id"], row["provider"], row["scope"], row["account"]
        )
        table.append(
            (
                row["provider"],
                scope,
                account,
                _state(row, now),
                _when(row["at_expires_at"]),
                _when(row["last_refresh"]),
                row["last_error"] or "-",
            )
        )
    head = ("PROVIDER", "SCOPE", "ACCOUNT", "STATE", "VALID UNTIL (UTC)", "LAST REFRESH (UTC)")
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    for line in [(*head, "LAST ERROR"), *table]:
        cells = [f"{v:<{w}}" for v, w in zip(line, widths, strict=False)]
        click.echo("  ".join([*cells, line[-1]]))


def _state(row: dict[str, object], now: float) -> str:
    state = str(row["state"])
    if state == "active":
        expires = row["at_expires_at"]
        valid = isinstance(expires, float) and expires > now
        if row["last_error"]:
            return "stale" if valid else "failed"
        return "valid" if valid else "expired"
    return state


def _when(value: object) -> str:
    """ISO 8601 in UTC (``Z``), to the second."""
    if not isinstance(value, float):
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
