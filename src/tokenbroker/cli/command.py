"""What every ``tokenbroker`` command shares: the ``--config`` option, the ``--listen`` check,
errors as exit codes, missing extras as a pip line, and opening the configured store.

Exit codes (DESIGN §3.4): 2 for a configuration or usage error (or a missing extra), 3 for an
unknown provider (or an unknown consumer), 4 for a provider that failed, 1 for any other
:class:`~tokenbroker.errors.TokenBrokerError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import click
from pydantic import ValidationError

from ..config import ServerSettings, Settings, load_settings, startup_problems
from ..engine.credentials import store_for as open_configured_store
from ..errors import ConfigError, ProviderError, TokenBrokerError, UnknownProviderError
from ..store import Store

__all__ = [
    "EXTRAS",
    "LOG_FILTER",
    "check_listen",
    "config_option",
    "fail",
    "needs_extra",
    "open_store",
]

#: Where the group leaves ``--log-filter`` (``TOKENBROKER_LOG_FILTER``) in ``ctx.meta``.
LOG_FILTER = "tokenbroker.log_filter"

_EXIT = {ConfigError: 2, UnknownProviderError: 3, ProviderError: 4}
#: The optional extras and the top-level modules each one brings.
EXTRAS = {
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

#: ``--config F``: default ``$TOKENBROKER_CONFIG``, else ``tokenbroker.yaml``.
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


def fail(exc: TokenBrokerError) -> NoReturn:
    """Print ``error: <exc>`` on stderr and exit with the code of its kind.

    Raises:
        SystemExit: Always: 2, 3, 4 or 1 as in the module docstring.
    """
    code = next((c for kind, c in _EXIT.items() if isinstance(exc, kind)), 1)
    click.echo(f"error: {exc}", err=True)
    raise SystemExit(code)


@contextmanager
def needs_extra(*extras: str) -> Iterator[None]:
    """Turn a missing optional dependency of ``extras`` into the pip line that installs it.

    Raises:
        SystemExit: 2, after printing ``pip install 'tokenbroker[extra]'``, when a module of
            one of ``extras`` is missing; any other missing module is re-raised as it is.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        for extra in extras:
            if top in EXTRAS[extra]:
                click.echo(
                    f"error: this command needs {top}, from the '{extra}' extra: "
                    f"pip install 'tokenbroker[{extra}]'",
                    err=True,
                )
                raise SystemExit(2) from None
        raise


def check_listen(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--listen`` is checked as ``server.listen`` is: a usage error (exit 2), not a traceback.

    Raises:
        click.BadParameter: ``value`` is no valid ``host:port``.
    """
    if value is not None:
        try:
            ServerSettings(listen=value)
        except ValidationError as exc:
            reason = exc.errors(include_input=False)[0]["msg"]
            raise click.BadParameter(reason.removeprefix("Value error, ")) from None
    return value


def open_store(config_path: Path, settings: Settings | None = None) -> Store:
    """The configured store, once the configuration has no start-up problem (the caller
    closes it).

    Args:
        config_path: The YAML configuration, read unless ``settings`` is given.
        settings: The configuration already loaded from ``config_path``.

    Raises:
        ConfigError: The configuration is invalid or has start-up problems.
    """
    settings = settings or load_settings(config_path)
    problems = startup_problems(settings)
    if problems:
        raise ConfigError(problems)
    return open_configured_store(settings)
