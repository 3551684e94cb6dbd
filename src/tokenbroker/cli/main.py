"""The ``tokenbroker`` command line (DESIGN §3.4).

Only this module configures logging handlers. Every command takes
``--config F`` (default ``$TOKENBROKER_CONFIG`` or ``tokenbroker.yaml``).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import httpx
from pydantic import ValidationError

from ..config import (
    ProxySettings,
    ServerSettings,
    Settings,
    config_warnings,
    load_settings,
    startup_problems,
)
from ..core.crypto import Keyring, generate_key
from ..core.names import CONSUMER_NAME
from ..core.rules import parse_rule, subject_entry
from ..engine.broker import Broker
from ..engine.consumers import hash_key, new_key
from ..engine.credentials import credential_label, store_for
from ..errors import (
    ConfigError,
    ConfigProblem,
    ProviderError,
    TokenBrokerError,
    UnknownProviderError,
)
from ..store import Store, probe
from ..telemetry.logs import configure

__all__ = ["main"]

_EXIT = {ConfigError: 2, UnknownProviderError: 3, ProviderError: 4}
#: The optional extras and the top-level modules each one brings.
_EXTRAS = {
    "server": {
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "prometheus_client",
        "limits",
    },
    "testing": {"authlib"},
}

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="tokenbroker.yaml",
    envvar="TOKENBROKER_CONFIG",
    show_default=True,
    show_envvar=True,
    help="The YAML configuration file.",
)


@click.group(context_settings={"auto_envvar_prefix": "TOKENBROKER"})
@click.version_option(package_name="tokenbroker")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="Log level on stderr.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log line format on stderr (serve uses telemetry.log_format).",
)
def main(log_level: str, log_format: str) -> None:
    """tokenbroker: obtain, cache, refresh and rotate upstream API tokens."""
    configure(log_level, log_format)


@contextmanager
def _extra(*extras: str) -> Iterator[None]:
    """Turn a missing optional dependency of ``extras`` into the pip line that installs it."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        for extra in extras:
            if top in _EXTRAS[extra]:
                click.echo(
                    f"error: this command needs {top}, from the '{extra}' extra: "
                    f"pip install 'tokenbroker[{extra}]'",
                    err=True,
                )
                raise SystemExit(2) from None
        raise


def _listen(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--listen`` is checked as ``server.listen`` is: a usage error (exit 2), not a traceback."""
    if value is not None:
        try:
            ServerSettings(listen=value)
        except ValidationError as exc:
            reason = exc.errors(include_input=False)[0]["msg"]
            raise click.BadParameter(reason.removeprefix("Value error, ")) from None
    return value


def _fail(exc: TokenBrokerError) -> None:
    code = next((c for kind, c in _EXIT.items() if isinstance(exc, kind)), 1)
    click.echo(f"error: {exc}", err=True)
    raise SystemExit(code)


@main.command()
@config_option
def check(config_path: Path) -> None:
    """Validate the configuration and the store; name every problem, never print a secret.

    Settings nothing reads yet are warnings. The store is only read, never created or migrated.
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
        _fail(exc)
        return
    names = ", ".join(sorted(settings.providers)) or "none"
    click.echo(f"{config_path}: ok ({len(settings.providers)} providers: {names})")
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


@main.command("serve")
@config_option
@click.option(
    "--listen",
    default=None,
    callback=_listen,
    help="host:port (default: server.listen, else 127.0.0.1:8750).",
)
def serve_command(config_path: Path, listen: str | None) -> None:
    """Serve the HTTP API, and the token proxy when configured (needs the 'server' extra)."""
    with _extra("server"):
        from .serve import serve  # noqa: PLC0415 - needs the optional 'server' extra

    try:
        with _login_progress() as progress:
            serve(config_path, listen, progress=progress, announce=_announce)
    except TokenBrokerError as exc:
        _fail(exc)


@main.command("proxy")
@config_option
@click.option("--listen", default=None, callback=_listen, help="host:port (default: proxy.listen).")
def proxy_command(config_path: Path, listen: str | None) -> None:
    """Run the token-injecting reverse proxy (the config's proxy: section)."""
    with _extra("server"):
        from .serve import run_proxy  # noqa: PLC0415 - needs the optional 'server' extra

    try:
        with _login_progress() as progress:
            run_proxy(config_path, listen, progress=progress, announce=_announce)
    except TokenBrokerError as exc:
        _fail(exc)


def _announce(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


@contextmanager
def _login_progress() -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar for pool logins on a terminal (stderr); nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label="logging in", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    yield progress


@main.group()
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
        _fail(exc)
        return
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


@main.command()
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
        _fail(exc)
        return
    click.echo(value.access_token)


def _open_store(config_path: Path, settings: Settings | None = None) -> Store:
    settings = settings or load_settings(config_path)
    problems = startup_problems(settings)
    if problems:
        raise ConfigError(problems)
    return store_for(settings)


@main.command()
@config_option
def status(config_path: Path) -> None:
    """One line per stored credential: provider, scope, account, state, valid until and last
    refresh (UTC), and a failing credential's last error (class, HTTP status, OAuth code)."""
    try:
        settings = load_settings(config_path)
        store = _open_store(config_path, settings)
    except TokenBrokerError as exc:
        _fail(exc)
        return
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


@main.command("rotate-key")
@config_option
def rotate_key(config_path: Path) -> None:
    """Re-encrypt every stored secret with the first of encryption_keys."""
    try:
        store = _open_store(config_path)
        try:
            count = store.rotate_keys()
        finally:
            store.close()
    except TokenBrokerError as exc:
        _fail(exc)
        return
    click.echo(f"re-encrypted {count} secret(s); only the first of encryption_keys is needed now")


@main.group()
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
        store = _open_store(config_path)
        try:
            store.add_consumer(name, hash_key(key), entries)
        finally:
            store.close()
    except TokenBrokerError as exc:
        _fail(exc)
        return
    click.echo(f"consumer {name} may use: {', '.join(str(r) for r in parsed)}", err=True)
    click.echo("the key is shown once; only its SHA-256 is stored:", err=True)
    click.echo(key)


@consumers.command("list")
@config_option
def consumers_list(config_path: Path) -> None:
    """List consumers (names and rules, never keys)."""
    try:
        settings = load_settings(config_path)
        store = _open_store(config_path)
        try:
            stored = store.consumers()
        finally:
            store.close()
    except TokenBrokerError as exc:
        _fail(exc)
        return
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
        store = _open_store(config_path)
        try:
            removed = store.remove_consumer(name)
        finally:
            store.close()
    except TokenBrokerError as exc:
        _fail(exc)
        return
    if not removed:
        click.echo(f"error: no stored consumer named {name!r}", err=True)
        raise SystemExit(3)
    click.echo(f"removed {name}")


@main.command()
def keygen() -> None:
    """Print a new encryption key (32 random bytes, URL-safe base64)."""
    click.echo(generate_key())


@main.command()
@click.option(
    "--duration",
    type=float,
    default=None,
    help="Stop after this many seconds (default: run until Ctrl-C).",
)
@click.option(
    "--lifetime",
    type=int,
    default=20,
    show_default=True,
    help="Lifetime in seconds of the demo server's tokens.",
)
@click.option(
    "--port", type=int, default=8750, show_default=True, help="Broker API port (if free)."
)
def dev(duration: float | None, lifetime: int, port: int) -> None:
    """Run a local demo: authorization server, demo upstream, broker API, curl lines."""
    with _extra("testing", "server"):
        from .demo import run_demo  # noqa: PLC0415 - needs the 'testing' and 'server' extras

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM (a service manager, `kill`) stops the demo as Ctrl-C does: servers closed,
    # temporary folder removed, "stopped" printed.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        run_demo(duration=duration, lifetime=lifetime, port=port, echo=click.echo)
    except KeyboardInterrupt:
        click.echo("stopped")


if __name__ == "__main__":  # pragma: no cover
    main()
