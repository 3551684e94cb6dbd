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
"""

from __future__ import annotations

import click

from ..telemetry.logs import configure
from .authorize import authorize
from .consumers import consumers
from .init import init
from .jobs import jobs, rotate_key, warm
from .keys import keygen
from .pool import pool
from .run import dev, proxy_command, serve_command
from .status import check, status, token
from .store import migrate

__all__ = ["main"]


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


for _command in (
    authorize,
    check,
    consumers,
    dev,
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
