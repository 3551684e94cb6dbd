"""Jobs end to end (issue 16): the service, runner, reaper, kinds and schedules against the
real authorization server, on the memory and SQLite stores."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import POOL_ACCOUNTS, BrokerFactory
from support import client_credentials, login, stampede, wait_for
from tokenbroker import Broker, parse_settings
from tokenbroker.config import JobsSettings
from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.secret import Secret
from tokenbroker.errors import (
    InvalidJobParamsError,
    JobNotRetryableError,
    UnknownJobError,
    UnknownJobKindError,
)
from tokenbroker.jobs.document import progress_of
from tokenbroker.jobs.model import Job, JobStatus
from tokenbroker.jobs.service import JobService
from tokenbroker.store import open_store
from tokenbroker.testing import AuthorizationServer
from tokenbroker.testing.faults import Fault

FAST = {
    "heartbeat_seconds": 0.1,
    "lease_seconds": 1.0,
    "poll_seconds": 0.05,
    "retry_backoff_seconds": 0.01,
}

ServiceFactory = Callable[..., JobService]


@pytest.fixture
def make_service() -> Iterator[ServiceFactory]:
    """``make_service(broker, run=True, **jobs_settings)``: a JobService, its loop running in
    a background thread unless ``run`` is False; stopped at teardown."""
    made: list[JobService] = []

    def factory(broker: Broker, *, run: bool = True, **overrides: Any) -> JobService:
        service = JobService(broker, settings=JobsSettings(**{**FAST, **overrides}))
        if run:
            service.start_background()
        made.append(service)
        return service

    yield factory
    for service in made:
        service.stop_background()


def finished(service: JobService, job_id: str, timeout: float = 15.0) -> Job:
    """Wait until the job reaches a final status and return it."""
    wait_for(lambda: service.require(job_id).status.final, f"job {job_id} to end", timeout)
    return service.require(job_id)


def logins_by_account(server: AuthorizationServer) -> dict[str, int]:
    """How many login requests the server saw per user name."""
    counts: dict[str, int] = {}
    for record in server.requests:
        if record.grant == "login" and isinstance(record.json, dict):
            name = record.json.get("username")
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_warm_logs_in_every_pool_account_with_monotonic_progress(
    pool_broker: Broker, auth_server: AuthorizationServer, make_service: ServiceFactory
) -> None:
    """A warm job logs in each pool account once, ends done at 100 with phases resolve →
    fetch → verify, and its numbered events never move progress backwards."""
    auth_server.reset_records()
    service = make_service(pool_broker)
    job, cached = service.start("warm", {"provider": "db"}, "ops")
    assert not cached and job.status is JobStatus.QUEUED
    done = finished(service, job.job_id)
    assert (done.status, done.progress, done.items.ok, done.items.failed) == (
        JobStatus.DONE,
        100.0,
        3,
        0,
    )
    assert logins_by_account(auth_server) == {name: 1 for name, _ in POOL_ACCOUNTS}
    events = service.events(job.job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].name == "completed" and events[-1].data["status"] == "done"
    updates = [e.data for e in events if e.name == "phase_update"]
    progress = [u["progress"] for u in updates]
    assert progress == sorted(progress)
    phases = list(dict.fromkeys(u["phase"] for u in updates))
    assert phases == ["resolve", "fetch", "verify"]
    assert [e.seq for e in service.events(job.job_id, after=2)] == [e.seq for e in events[2:]]
    assert done.started_at is not None and done.finished_at is not None


def test_idempotent_start_returns_the_active_job(
    pool_broker: Broker, make_service: ServiceFactory
) -> None:
    """The same kind and params (any key order) while queued returns that job, cached; other
    params, or the same after it ended, make a new job."""
    service = make_service(pool_broker, run=False)
    first, cached = service.start("warm", {"provider": "db", "concurrency": 2}, "ops")
    again, cached_again = service.start("warm", {"concurrency": 2, "provider": "db"}, "etl")
    assert (cached, cached_again, again.job_id) == (False, True, first.job_id)
    other, cached_other = service.start("warm", {"provider": "db", "concurrency": 3}, "ops")
    assert not cached_other and other.job_id != first.job_id
    service.cancel(first.job_id)
    fresh, cached_fresh = service.start("warm", {"provider": "db", "concurrency": 2}, "ops")
    assert not cached_fresh and fresh.job_id not in (first.job_id, other.job_id)


def test_unknown_job_id_is_an_error_never_a_default(
    pool_broker: Broker, make_service: ServiceFactory
) -> None:
    """An unknown id: get is None; require, cancel, retry and events raise UnknownJobError."""
    service = make_service(pool_broker, run=False)
    assert service.get("job_nope") is None
    for call in (service.require, service.cancel, service.retry, service.events):
        with pytest.raises(UnknownJobError):
            call("job_nope")


def test_bad_kind_and_params_are_named(pool_broker: Broker, make_service: ServiceFactory) -> None:
    """An unknown kind lists the kinds; bad params name the field; nothing is stored."""
    service = make_service(pool_broker, run=False)
    with pytest.raises(UnknownJobKindError) as unknown:
        service.start("explode", {}, "ops")
    assert all(k in str(unknown.value) for k in ("warm", "refresh", "rotate_key", "keepalive"))
    cases = [
        ({}, "provider"),
        ({"provider": "nope"}, "provider"),
        ({"provider": "db", "concurrency": 0}, "concurrency"),
        ({"provider": "db", "colour": "red"}, "colour"),
        ({"provider": "db", "items": "alice"}, "items"),
    ]
    for params, field in cases:
        with pytest.raises(InvalidJobParamsError) as bad:
            service.start("warm", params, "ops")
        assert bad.value.field == field
    with pytest.raises(InvalidJobParamsError):
        service.start("warm", {"provider": "db", "scopes": ["x" * 100] * 100}, "ops")
    assert service.list()[0] == []


def test_transient_failures_are_retried_with_real_requests_until_done(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, make_service: ServiceFactory
) -> None:
    """Two 503s for one account: the job waits out the token cache's remembered failure, so
    its 3 attempts are 3 login requests for that account, and the job ends done."""
    auth_server.add_account("carol", "carol-pw")
    credentials = [{"username": u, "password": p} for u, p in POOL_ACCOUNTS]
    broker = make_broker(
        {"db": login(auth_server, credentials=credentials)}, defaults={"retries": 0}
    )
    service = make_service(broker)
    auth_server.reset_records()
    auth_server.inject(Fault(status=503), times=2, path="/api/login")
    job, _ = service.start("warm", {"provider": "db", "concurrency": 1}, "ops")
    done = finished(service, job.job_id)
    assert (done.status, done.items.ok, done.failed) == (JobStatus.DONE, 3, ())
    row = broker.store.job(job.job_id)
    assert row is not None and progress_of(row).attempts["alice"] == 3
    assert logins_by_account(auth_server) == {"alice": 3, "bob": 1, "carol": 1}


def test_partial_job_retry_asks_again_for_only_the_failed_items(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, make_service: ServiceFactory
) -> None:
    """Three 503s for one account end the job partial with that account failed transient
    and retryable after exactly 3 login requests; the retry job asks the server again for
    that account only (after the cache's remembered failure, without clearing it)."""
    auth_server.add_account("carol", "carol-pw")
    credentials = [{"username": u, "password": p} for u, p in POOL_ACCOUNTS]
    broker = make_broker(
        {"db": login(auth_server, credentials=credentials)}, defaults={"retries": 0}
    )
    service = make_service(broker)
    auth_server.reset_records()
    auth_server.inject(Fault(status=503), times=3, path="/api/login")
    job, _ = service.start("warm", {"provider": "db", "concurrency": 1}, "ops")
    first = finished(service, job.job_id)
    assert first.status is JobStatus.PARTIAL
    assert [(f.item, f.retryable) for f in first.failed] == [("alice", True)]
    assert first.failed[0].reason.startswith("provider_unavailable")
    row = broker.store.job(job.job_id)
    assert row is not None and progress_of(row).attempts["alice"] == 3
    assert logins_by_account(auth_server) == {"alice": 3, "bob": 1, "carol": 1}
    failed_events = [e for e in service.events(job.job_id) if e.name == "item_failed"]
    assert [e.data["item"] for e in failed_events] == ["alice"]

    auth_server.reset_records()
    retry, cached = service.retry(job.job_id)
    assert not cached and retry.params["items"] == ["alice"]
    second = finished(service, retry.job_id)
    assert (second.status, second.items.total, second.items.ok) == (JobStatus.DONE, 1, 1)
    row = broker.store.job(retry.job_id)
    assert row is not None and progress_of(row).attempts["alice"] == 1
    assert logins_by_account(auth_server) == {"alice": 1}
    with pytest.raises(JobNotRetryableError):
        service.retry(retry.job_id)


def test_cancel_stops_between_items_and_reports_canceled_after(
    auth_server: AuthorizationServer, pool_broker: Broker, make_service: ServiceFactory
) -> None:
    """Cancel during the first of three slow logins: the job is canceling, the in-flight
    login finishes, no further login starts, and only then is it canceled."""
    auth_server.latency = 0.3
    auth_server.reset_records()
    service = make_service(pool_broker)
    job, _ = service.start("warm", {"provider": "db", "concurrency": 1}, "ops")
    wait_for(lambda: auth_server.in_flight == 1, "the first login to be in flight")
    asked = service.cancel(job.job_id)
    assert asked.status is JobStatus.CANCELING
    ended = finished(service, job.job_id)
    assert ended.status is JobStatus.CANCELED
    assert auth_server.in_flight == 0
    assert auth_server.count("login") == 1
    assert ended.items.ok + ended.items.failed < 3
    assert service.events(job.job_id)[-1].name == "canceled"


def test_queued_job_is_canceled_at_once(pool_broker: Broker, make_service: ServiceFactory) -> None:
    """A queued job cancels straight to canceled with its final event; a repeat changes nothing."""
    service = make_service(pool_broker, run=False)
    job, _ = service.start("warm", {"provider": "db"}, "ops")
    assert service.cancel(job.job_id).status is JobStatus.CANCELED
    assert [e.name for e in service.events(job.job_id)] == ["canceled"]
    assert service.cancel(job.job_id).status is JobStatus.CANCELED
    assert len(service.events(job.job_id)) == 1


def test_refresh_raced_by_jobs_and_callers_makes_one_token_request(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, make_service: ServiceFactory
) -> None:
    """Sixteen racing refresh starts and sixteen get_token callers on a warm key cause exactly
    one token request (one job; compare-and-invalidate; single flight)."""
    broker = make_broker({"svc": client_credentials(auth_server)})
    old = broker.get_token("svc").access_token
    service = make_service(broker)
    auth_server.reset_counts()
    results = stampede(16, lambda: service.start("refresh", {"provider": "svc"}, "ops"))
    jobs = {r[0].job_id for r in results if isinstance(r, tuple)}
    assert len(jobs) == 1
    (job_id,) = jobs
    stampede(16, lambda: broker.get_token("svc"))
    assert finished(service, job_id).status is JobStatus.DONE
    assert auth_server.count("client_credentials") == 1
    assert broker.get_token("svc").access_token != old


def test_rotate_key_leaves_nothing_under_the_old_key_and_resumes(
    auth_server: AuthorizationServer, tmp_path: Path, make_service: ServiceFactory
) -> None:
    """rotate_key re-encrypts row by row (skipping rows done before it started, as a resumed
    job does); afterwards the new key alone opens the store and the old one opens nothing."""
    old, new = generate_key(), generate_key()
    url = f"sqlite:///{tmp_path / 'tb.db'}"
    config = {
        "store": url,
        "providers": {
            "db": login(auth_server),
            "svc": client_credentials(auth_server),
        },
    }

    def broker_with(*keys: str) -> Broker:
        return Broker(parse_settings(yaml.safe_dump({**config, "encryption_keys": list(keys)}), {}))

    first = broker_with(old)
    for account in ("alice", "bob"):
        first.get_token("db", account=account)
    first.get_token("svc")
    first.close()
    both = broker_with(new, old)
    stale = both.store.stale_secrets()
    assert len(stale) >= 3
    assert both.store.reseal_row(stale[0]) > 0  # a previous run got this far
    service = make_service(both)
    job, _ = service.start("rotate_key", {}, "ops")
    done = finished(service, job.job_id)
    assert (done.status, done.items.total, done.items.ok) == (
        JobStatus.DONE,
        len(stale) - 1,
        len(stale) - 1,
    )
    assert both.store.stale_secrets() == []
    service.stop_background()
    both.close()
    only_new = open_store(url, Keyring([Secret(new)]))
    assert len(only_new.states()) >= 3
    only_new.close()
    with pytest.raises(Exception, match="key"):
        open_store(url, Keyring([Secret(old)]))


def test_schedule_starts_once_across_two_services_on_one_store(
    auth_server: AuthorizationServer, tmp_path: Path, make_service: ServiceFactory
) -> None:
    """Two services (their own brokers and connections) on one SQLite file, each with a
    start-up warm schedule: exactly one scheduled job is started."""
    key = generate_key()
    config = {
        "store": f"sqlite:///{tmp_path / 'tb.db'}",
        "encryption_keys": [key],
        "providers": {"db": login(auth_server)},
    }
    brokers = [Broker(parse_settings(yaml.safe_dump(config), {})) for _ in range(2)]
    try:
        schedule = [
            {"name": "boot", "kind": "warm", "params": {"provider": "db"}, "at_startup": True}
        ]
        services = [make_service(b, run=False, schedule=schedule) for b in brokers]
        barrier = threading.Barrier(2)

        def tick(service: JobService) -> list[str]:
            barrier.wait()
            return service.scheduler.tick()

        outcomes: list[list[str]] = []
        threads = [threading.Thread(target=lambda s=s: outcomes.append(tick(s))) for s in services]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(len(o) for o in outcomes) == [0, 1]
        jobs, _ = services[0].list()
        assert [(j.kind, j.requested_by) for j in jobs] == [("warm", "schedule:boot")]
        assert services[1].scheduler.tick() == [] and services[0].scheduler.tick() == []
    finally:
        for b in brokers:
            b.close()


def test_subscription_wakes_a_waiting_reader_and_closes_at_once(
    pool_broker: Broker, make_service: ServiceFactory
) -> None:
    """A reader subscribed to a job is woken by its progress; 1,000 subscriptions opened and
    closed leave none."""
    service = make_service(pool_broker)

    async def follow() -> int:
        job, _ = service.start("warm", {"provider": "db"}, "ops")
        woken = 0
        with service.subscribe(job.job_id) as subscription:
            while not service.require(job.job_id).status.final:
                woken += await subscription.wait(timeout=5)
        subs = [service.subscribe(job.job_id) for _ in range(1000)]
        assert len(service.hub) == 1000
        for s in subs:
            s.close()
        return woken

    assert asyncio.run(follow()) >= 1
    assert len(service.hub) == 0


def test_no_secret_is_stored_in_a_job(
    auth_server: AuthorizationServer, pool_broker: Broker, make_service: ServiceFactory
) -> None:
    """After a warm job the job rows, documents and events hold no password or token."""
    service = make_service(pool_broker)
    job, _ = service.start("warm", {"provider": "db"}, "ops")
    finished(service, job.job_id)
    row = pool_broker.store.job(job.job_id)
    assert row is not None
    text = row.document + "".join(e.data for e in pool_broker.store.job_events(job.job_id))
    text += repr(row) + repr(service.require(job.job_id))
    secrets = [pw for _, pw in POOL_ACCOUNTS] + auth_server.issued_login_tokens
    assert secrets and not any(s in text for s in secrets)


def test_keepalive_refreshes_only_idle_refresh_tokens(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, make_service: ServiceFactory
) -> None:
    """keepalive uses a never-refreshed idle-expiring refresh token once; run again at once,
    nothing is due and no token request is made."""
    from support import refresh_token

    seed = auth_server.issue_refresh_token("rt-client")
    broker = make_broker(
        {"tesla": refresh_token(auth_server, seed, rotation={"idle_expiry_days": 90})}
    )
    service = make_service(broker)
    auth_server.reset_counts()
    job, _ = service.start("keepalive", {}, "ops")
    first = finished(service, job.job_id)
    assert (first.status, first.items.total) == (JobStatus.DONE, 1)
    assert auth_server.count("refresh_token") == 1
    again, _ = service.start("keepalive", {"provider": "tesla"}, "ops")
    second = finished(service, again.job_id)
    assert (second.status, second.items.total) == (JobStatus.DONE, 0)
    assert auth_server.count("refresh_token") == 1
    with pytest.raises(InvalidJobParamsError) as bad:
        service.start("keepalive", {"provider": "nope"}, "ops")
    assert bad.value.field == "provider"


def test_per_consumer_limit_refuses_more_active_jobs(
    pool_broker: Broker, make_service: ServiceFactory
) -> None:
    """A consumer at max_running_per_consumer active jobs gets JobLimitError with a
    Retry-After; another consumer, or a repeat of an active job, still gets through."""
    from tokenbroker.errors import JobLimitError

    service = make_service(pool_broker, run=False, max_running_per_consumer=2)
    service.start("warm", {"provider": "db", "concurrency": 1}, "ops")
    service.start("warm", {"provider": "db", "concurrency": 2}, "ops")
    with pytest.raises(JobLimitError) as limited:
        service.start("warm", {"provider": "db", "concurrency": 3}, "ops")
    assert limited.value.retry_after > 0
    assert service.start("warm", {"provider": "db", "concurrency": 1}, "ops")[1] is True
    assert service.start("warm", {"provider": "db", "concurrency": 3}, "etl")[1] is False


def test_jobs_settings_refuse_a_lease_shorter_than_two_heartbeats() -> None:
    """jobs.lease_seconds below twice heartbeat_seconds is a config error naming the rule."""
    with pytest.raises(ValueError, match="twice heartbeat"):
        JobsSettings(heartbeat_seconds=5, lease_seconds=8)
    assert JobsSettings().result_ttl_seconds == 86_400
