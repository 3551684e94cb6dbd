"""``tokenbroker authorize PROVIDER``: re-authorise a refresh-token provider, like
``gcloud auth login``.

It starts an ``authorize`` job on a running broker (``--url`` / ``$TOKENBROKER_URL``,
``--key`` / ``$TOKENBROKER_API_KEY``: a consumer key with the ``jobs`` permission and the
provider), prints the job's authorization URL (and opens it in a browser when stdout is a
terminal and ``$BROWSER`` or ``$DISPLAY`` says one is available), follows the job's stream
while the person signs in, and exits 0 once the provider is connected; otherwise non-zero
with the reason (``access_denied``, ``expired``, ``possible_mix_up``, …).
"""

from __future__ import annotations

import os
import sys
import webbrowser

import click

from ..errors import TokenBrokerError
from ..jobs.model import JobStatus
from .command import fail
from .jobs import _client, key_option, url_option
from .progress import exit_code, watch

__all__ = ["authorize"]


def _browser_available() -> bool:
    return sys.stdout.isatty() and bool(os.environ.get("BROWSER") or os.environ.get("DISPLAY"))


@click.command("authorize")
@click.argument("provider")
@click.option("--account", default=None, help="The account (refresh-token providers have none).")
@click.option("--no-browser", is_flag=True, help="Only print the URL.")
@url_option
@key_option
def authorize(
    provider: str, account: str | None, no_browser: bool, url: str | None, key: str | None
) -> None:
    """Re-authorise PROVIDER: open the printed URL, sign in and consent; exits 0 when
    connected."""
    client = _client(url, key)
    params = {"provider": provider, **({"account": account} if account else {})}
    try:
        started = client.start_job("authorize", params)
        job_id = started["job_id"]
        link = started.get("authorize_url")
        if not link:
            job = client.job(job_id)
            error = job.get("error") or {}
            click.echo(f"error: authorisation could not start: {error.get('type')}", err=True)
            raise SystemExit(1)
        click.echo(f"Open this URL to authorise {provider} (job {job_id}):")
        click.echo(link)
        if not no_browser and _browser_available():
            webbrowser.open(link)
        view = watch(client.stream(job_id))
        status = view.status or JobStatus(str(client.job(job_id)["status"]))
        if status is JobStatus.DONE:
            click.echo(f"{provider}: connected.")
            raise SystemExit(0)
        error = client.job(job_id).get("error") or {}
        click.echo(
            f"error: {provider} not connected: {status.value}"
            f" ({error.get('type', '-')}: {error.get('message', '')})",
            err=True,
        )
        try:
            raise SystemExit(exit_code(status) or 1)
        except ValueError:
            raise SystemExit(1) from None
    except TokenBrokerError as exc:
        fail(exc)
    finally:
        client.close()
