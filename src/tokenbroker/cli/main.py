"""The ``tokenbroker`` command line (DESIGN §3.4): the click group and its log options.

Only the command line configures logging handlers. Every command that reads the
configuration takes ``--config F`` (default ``$TOKENBROKER_CONFIG`` or ``tokenbroker.yaml``;
see :mod:`tokenbroker.cli.command`, which also maps errors to exit codes). The commands
live one group per module:

* :mod:`~tokenbroker.cli.status`: ``check``, ``status``, ``token``
* :mod:`~tokenbroker.cli.consumers`: ``consumers add|list|remove``
* :mod:`~tokenbroker.cli.keys`: ``keygen``
* :mod:`~tokenbroker.cli.jobs`: ``jobs start|list|show|watch|cancel|retry``, ``warm``,
  ``rotate-key``
* :mod:`~tokenbroker.cli.pool`: ``pool status``
* :mod:`~tokenbroker.cli.run`: ``serve``, ``proxy``, ``dev``
* :mod:`~tokenbroker.cli.store`: ``migrate``
* :mod:`~tokenbroker.cli.imports`: ``import tpp``
* :mod:`~tokenbroker.cli.init`: ``init``
"""

from __future__ import annotations

import click

from ..config.logfilter import parse_log_filter
from ..telemetry.logs import configure
from .authorize import authorize
from .command import LOG_FILTER
from .consumers import consumers
from .imports import import_group
from .init import init
from .jobs import jobs, rotate_key, warm
from .keys import keygen
from .pool import pool
from .run import dev, proxy_command, serve_command
from .status import check, status, token
from .store import migrate

__all__ = ["main"]


def _check_filter(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_log_filter(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


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
@click.option(
    "--log-filter",
    default=None,
    callback=_check_filter,
    help="Per-logger levels, e.g. info,tokenbroker.proxy=debug (for serve and proxy too, "
    "replacing telemetry.log_filter).",
)
@click.pass_context
def main(ctx: click.Context, log_level: str, log_format: str, log_filter: str | None) -> None:
    """tokenbroker: obtain, cache, refresh and rotate upstream API tokens."""
    configure(log_level, log_format, log_filter)
    ctx.meta[LOG_FILTER] = log_filter


for _command in (
    authorize,
    check,
    consumers,
    dev,
    import_group,
    init,
    jobs,
    keygen,
    migrate,
    pool,
    proxy_command,
    rotate_key,
    serve_command,
    status,
    token,
    warm,
):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
