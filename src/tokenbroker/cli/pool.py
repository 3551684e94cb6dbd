"""``tokenbroker pool status``: a running proxy's pools, read from its health port.

The table comes from the proxy's ``/health`` document (no secrets in it); anything else
answering there — the API port, a web server — is refused with exit 1, as is silence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import httpx

from ..config import load_settings
from ..errors import ConfigError, ConfigProblem, TokenBrokerError
from .command import config_option, fail

__all__ = ["pool"]


@click.group("pool")
def pool() -> None:
    """Inspect the token proxy's pools."""


@pool.command("status")
@config_option
@click.option(
    "--url", default=None, help="The health port URL (default: from proxy.health_listen)."
)
def pool_status(config_path: Path, url: str | None) -> None:
    """Print each pool's tokens in use, available and waiting, and per-account counters."""
    try:
        if url is None:
            settings = load_settings(config_path)
            if settings.proxy is None or settings.proxy.health_listen is None:
                raise ConfigError([ConfigProblem("proxy.health_listen", "is required")])
            host, _, port = settings.proxy.health_listen.rpartition(":")
            wildcard = host in ("0.0.0.0", "", "[::]")  # noqa: S104 - reading, not binding
            url = f"http://{'127.0.0.1' if wildcard else host}:{port}"
    except TokenBrokerError as exc:
        fail(exc)
    target = f"{url.rstrip('/')}/health"
    try:
        reply = httpx.get(target, timeout=5.0)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        click.echo(f"error: cannot read {target}: nothing answers ({type(exc).__name__})", err=True)
        raise SystemExit(1) from None
    health = _proxy_health(reply)
    if health is None:
        click.echo(
            f"error: cannot read {target}: not a tokenbroker proxy health port "
            f"(HTTP {reply.status_code})",
            err=True,
        )
        raise SystemExit(1)
    click.echo(_pool_table(health))


def _proxy_health(reply: httpx.Response) -> dict[str, Any] | None:
    """The proxy health port's ``/health`` document, or None for any other answer (the API
    port's ``/health``, a web server's 404 page)."""
    if reply.status_code != 200:
        return None
    try:
        health = reply.json()
    except ValueError:
        return None
    shaped = (
        isinstance(health, dict)
        and isinstance(health.get("pool"), dict)
        and isinstance(health.get("routes"), list)
    )
    return health if shaped else None


def _pool_table(health: dict[str, Any]) -> str:
    total = health.get("pool", {})
    lines = [
        f"status {health.get('status')}: {total.get('in_use', 0)} of {total.get('total', 0)} "
        f"tokens in use, {total.get('available', 0)} available, "
        f"{total.get('waiting', 0)} connection(s) waiting"
    ]
    states = health.get("providers") or {}
    for route in health.get("routes", []):
        pool = route.get("pool")
        state = f"; provider {states[route['provider']]}" if route["provider"] in states else ""
        if pool is None:
            lines.append(f"route {route['prefix']} -> {route['provider']} (shared){state}")
            continue
        lines.append(
            f"route {route['prefix']} -> {route['provider']} (pool): total {pool['total']}, "
            f"in use {pool['in_use']}, available {pool['available']}, "
            f"waiting {pool['waiting']}{state}"
        )
        lines.append(
            f"  {'ACCOUNT':<24} {'STATE':<12} {'USES':>8} {'ERRORS':>8} {'LOGINS':>8}  LAST USE"
        )
        for c in pool["credentials"]:
            idle = c.get("idle_seconds")
            last = "never" if idle is None else f"{idle:.0f} s ago"
            lines.append(
                f"  {c['account']:<24} {c['state']:<12} {c['uses']:>8} {c['errors']:>8} "
                f"{c['refreshes']:>8}  {last}"
            )
    return "\n".join(lines)
