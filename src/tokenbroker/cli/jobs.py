"""``tokenbroker jobs …``, ``warm`` and ``rotate-key``: start, list, show, watch, cancel and
retry jobs.

``jobs`` talks to a running broker (``--url`` / ``$TOKENBROKER_URL``, ``--key`` /
``$TOKENBROKER_API_KEY``, a consumer key with the ``jobs`` permission) through
:class:`~tokenbroker.BrokerClient`. ``jobs watch`` (and ``--follow``) draws the job's
progress from its SSE stream (:func:`tokenbroker.cli.progress.watch`: bars on a terminal,
plain lines otherwise) and exits with :func:`~tokenbroker.cli.progress.exit_code` of the
job's final status: 0 done, 1 failed, 2 partial or canceled.

``warm PROVIDER`` and ``rotate-key`` start their job and follow it: on the server with
``--url``; without it, in this process on the configured store
(:class:`~tokenbroker.jobs.service.JobService`), so ``rotate-key`` needs no server and a
run that is interrupted is resumed by the next one (or by a server on the same store).

The API key's variable is ``TOKENBROKER_API_KEY``, not ``TOKENBROKER_KEY``: configs use
``${TOKENBROKER_KEY}`` for the store's encryption key, which must never be sent anywhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from ..client.remote import BrokerClient
from ..config import load_settings, startup_problems
from ..engine.broker import Broker
from ..errors import ConfigError, TokenBrokerError
from ..jobs.events import JobEvent, event_from
from ..jobs.model import Job, JobStatus
from ..jobs.service import JobService
from .command import config_option, fail
from .progress import exit_code, watch

__all__ = ["jobs", "rotate_key", "warm"]

url_option = click.option(
    "--url",
    envvar="TOKENBROKER_URL",
    show_envvar=True,
    help="The broker's base URL, e.g. http://127.0.0.1:8750.",
)
key_option = click.option(
    "--key",
    envvar="TOKENBROKER_API_KEY",
    show_envvar=True,
    help="A consumer API key with the jobs permission.",
)


def _client(url: str | None, key: str | None) -> BrokerClient:
    if not url or not key:
        raise click.UsageError("needs --url and --key (or TOKENBROKER_URL, TOKENBROKER_API_KEY)")
    try:
        return BrokerClient(url, api_key=key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _param(values: tuple[str, ...]) -> dict[str, Any]:
    """``k=v`` pairs as params: ``v`` as JSON when it is JSON (numbers, lists), else text."""
    params: dict[str, Any] = {}
    for pair in values:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--param")
        try:
            params[name] = json.loads(raw)
        except ValueError:
            params[name] = raw
    return params


def _follow(events: Iterator[JobEvent], final: Callable[[], str]) -> int:
    """Show ``events`` until the final one and return the exit code of the job's status
    (read with ``final()`` when the events ended before a final event)."""
    view = watch(events)
    status = view.status or JobStatus(final())
    try:
        return exit_code(status)
    except ValueError:
        click.echo(f"error: the job is still {status.value}", err=True)
        return 1


def _remote(url: str | None, key: str | None, kind: str, params: dict[str, Any]) -> int:
    """Start a job on the server and follow it; the exit code."""
    client = _client(url, key)
    try:
        started = client.start_job(kind, params)
        job_id = started["job_id"]
        click.echo(f"job {job_id} {'(already running) ' if started['cached'] else ''}started")
        return _follow(client.stream(job_id), lambda: str(client.job(job_id)["status"]))
    except TokenBrokerError as exc:
        fail(exc)
    finally:
        client.close()


def _local_events(service: JobService, job_id: str, poll: float = 0.1) -> Iterator[JobEvent]:
    """A local job's stored events until the final one (the store is polled)."""
    after = 0
    while True:
        for stored in service.events(job_id, after):
            after = stored.seq
            event = event_from(stored.name, stored.seq, dict(stored.data))
            if event is not None:
                yield event
            if stored.final:
                return
        time.sleep(poll)


def _in_process(config_path: Path, kind: str, params: dict[str, Any]) -> tuple[Job, int]:
    """Run a job in this process on the configured store, following it; the job at its end
    and the exit code."""
    settings = load_settings(config_path)
    problems = startup_problems(settings)
    if problems:
        raise ConfigError(problems)
    broker = Broker(settings)
    service = JobService(broker)
    service.start_background()
    try:
        job, cached = service.start(kind, params, "cli")
        if cached:
            click.echo(f"job {job.job_id} is already active; following it")
        code = _follow(
            _local_events(service, job.job_id), lambda: service.require(job.job_id).status.value
        )
        return service.require(job.job_id), code
    finally:
        service.stop_background()
        broker.close()


@click.group("jobs")
def jobs() -> None:
    """Start, list, show, watch, cancel and retry a running broker's jobs."""


@jobs.command("start")
@click.argument("kind")
@click.option("--provider", help="The provider param (warm, refresh, keepalive).")
@click.option("--param", "params", multiple=True, help="Another param as NAME=VALUE.")
@click.option("--follow", is_flag=True, help="Follow the job until it ends.")
@url_option
@key_option
def start(
    kind: str,
    provider: str | None,
    params: tuple[str, ...],
    follow: bool,
    url: str | None,
    key: str | None,
) -> None:
    """Start a job of KIND (warm, refresh, rotate_key, keepalive)."""
    values = _param(params)
    if provider is not None:
        values["provider"] = provider
    if follow:
        raise SystemExit(_remote(url, key, kind, values))
    client = _client(url, key)
    try:
        started = client.start_job(kind, values)
    except TokenBrokerError as exc:
        fail(exc)
    finally:
        client.close()
    click.echo(f"{started['job_id']} {started['status']}{' cached' if started['cached'] else ''}")


@jobs.command("list")
@click.option("--status", help="Only jobs in this status.")
@click.option("--kind", help="Only jobs of this kind.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@url_option
@key_option
def list_jobs(
    status: str | None, kind: str | None, limit: int, url: str | None, key: str | None
) -> None:
    """List jobs, newest first."""
    client = _client(url, key)
    try:
        page = client.jobs(status=status, kind=kind, limit=limit)
    except TokenBrokerError as exc:
        fail(exc)
    finally:
        client.close()
    for job in page["jobs"]:
        click.echo(
            f"{job['job_id']}  {job['kind']:<10} {job['status']:<9} {job['progress']:>6.1f}%  "
            f"{job['phase'] or '-':<8} {job['created_at']}"
        )


def _one(action: str) -> Callable[[str, str | None, str | None], None]:
    def command(job_id: str, url: str | None, key: str | None) -> None:
        client = _client(url, key)
        try:
            call = {"show": client.job, "cancel": client.cancel_job, "retry": client.retry_job}
            body = call[action](job_id)
        except TokenBrokerError as exc:
            fail(exc)
        finally:
            client.close()
        click.echo(json.dumps(body, indent=2, sort_keys=True))

    return command


for _action, _help in (
    ("show", "Show a job (status, phase, progress, items, failures)."),
    ("cancel", "Ask a job to stop (canceled once its work has stopped)."),
    ("retry", "Start a new job for only the failed retryable items of a job."),
):
    jobs.command(_action, help=_help)(
        click.argument("job_id")(url_option(key_option(_one(_action))))
    )


@jobs.command("watch")
@click.argument("job_id")
@url_option
@key_option
def watch_job(job_id: str, url: str | None, key: str | None) -> None:
    """Follow a job's progress until it ends; exit 0 done, 1 failed, 2 partial/canceled."""
    client = _client(url, key)
    try:
        code = _follow(client.stream(job_id), lambda: str(client.job(job_id)["status"]))
    except TokenBrokerError as exc:
        fail(exc)
    finally:
        client.close()
    raise SystemExit(code)


@click.command("warm")
@click.argument("provider")
@click.option("--concurrency", type=click.IntRange(1, 64), help="Logins at once.")
@config_option
@url_option
@key_option
def warm(
    provider: str, concurrency: int | None, config_path: Path, url: str | None, key: str | None
) -> None:
    """Obtain every account's / scope's token of PROVIDER now (a warm job), and follow it."""
    params: dict[str, Any] = {"provider": provider}
    if concurrency is not None:
        params["concurrency"] = concurrency
    if url:
        raise SystemExit(_remote(url, key, "warm", params))
    try:
        _, code = _in_process(config_path, "warm", params)
    except TokenBrokerError as exc:
        fail(exc)
    raise SystemExit(code)


@click.command("rotate-key")
@config_option
@url_option
@key_option
def rotate_key(config_path: Path, url: str | None, key: str | None) -> None:
    """Re-encrypt every stored secret with the first of encryption_keys (a rotate_key job)."""
    if url:
        raise SystemExit(_remote(url, key, "rotate_key", {}))
    try:
        job, code = _in_process(config_path, "rotate_key", {})
    except TokenBrokerError as exc:
        fail(exc)
    if code == 0:
        click.echo(
            f"re-encrypted {job.items.ok} secret(s); "
            "only the first of encryption_keys is needed now"
        )
    raise SystemExit(code)
