"""``tokenbroker serve``, ``proxy`` and ``dev``: the commands that run until stopped.

``serve`` and ``proxy`` run on the start-up skeleton of :mod:`tokenbroker.cli.serve` (which
needs the 'server' extra, imported only when one of them runs); ``dev`` runs the local demo
of :mod:`tokenbroker.cli.demo` (the 'testing' and 'server' extras). Listener addresses are
announced on stdout, one line each, once they listen; a pool's log-in progress goes to a
terminal's stderr.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..errors import TokenBrokerError
from .command import check_listen, config_option, fail, needs_extra

__all__ = ["dev", "proxy_command", "serve_command"]


@click.command("serve")
@config_option
@click.option(
    "--listen",
    default=None,
    callback=check_listen,
    help="host:port (default: server.listen, else 127.0.0.1:8750).",
)
def serve_command(config_path: Path, listen: str | None) -> None:
    """Serve the HTTP API, and the token proxy when configured (needs the 'server' extra)."""
    with needs_extra("server"):
        from .serve import serve  # noqa: PLC0415 - needs the optional 'server' extra

    try:
        with _login_progress() as progress:
            serve(config_path, listen, progress=progress, announce=_announce)
    except TokenBrokerError as exc:
        fail(exc)


@click.command("proxy")
@config_option
@click.option(
    "--listen", default=None, callback=check_listen, help="host:port (default: proxy.listen)."
)
def proxy_command(config_path: Path, listen: str | None) -> None:
    """Run the token-injecting reverse proxy (the config's proxy: section)."""
    with needs_extra("server"):
        from .serve import run_proxy  # noqa: PLC0415 - needs the optional 'server' extra

    try:
        with _login_progress() as progress:
            run_proxy(config_path, listen, progress=progress, announce=_announce)
    except TokenBrokerError as exc:
        fail(exc)


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


@click.command("dev")
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
    with needs_extra("testing", "server"):
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
