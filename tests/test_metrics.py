"""Job metrics (issue 16 item 11): job lifecycle events published on a real broker's event
bus show up in the exposition text of a real CollectorRegistry, labelled by kind, status,
phase and outcome only."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from tokenbroker import Broker, parse_settings
from tokenbroker.core.events import JobFinished, JobItemFinished, JobPhaseChanged, JobStarted
from tokenbroker.telemetry.metrics import Metrics

JOB = "job_Zq3xXb1mQ9YpV7cN2wK4rA"
ITEM = "alice@example.com"


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A broker with no providers on an in-memory store."""
    broker = Broker(parse_settings("store: memory\nproviders: {}\n", {}))
    yield broker
    broker.close()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of one sample, read from the rendered exposition text (None if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.M)
    for match in pattern.finditer(metrics.render().decode()):
        found = ",".join(sorted((match.group(1) or "").split(","))) if match.group(1) else ""
        if found == wanted:
            return float(match.group(2))
    return None


def run_warm_job(broker: Broker, job_id: str = JOB, failures: int = 1) -> None:
    """Publish a warm job's events as the runner does: 3 phases, 4 items, ``failures`` failed."""
    emit = broker.events.emit
    emit(JobStarted(provider="pool", job_id=job_id, kind="warm"))
    emit(JobPhaseChanged(provider="pool", job_id=job_id, kind="warm", phase="resolve"))
    emit(
        JobPhaseChanged(
            provider="pool",
            job_id=job_id,
            kind="warm",
            phase="fetch",
            previous="resolve",
            previous_duration=0.05,
        )
    )
    for n in range(4):
        failed = n < failures
        emit(
            JobItemFinished(
                provider="pool",
                job_id=job_id,
                kind="warm",
                phase="fetch",
                item=ITEM if failed else f"user{n}",
                outcome="failed" if failed else "ok",
                reason="invalid_grant" if failed else None,
            )
        )
    emit(
        JobPhaseChanged(
            provider="pool",
            job_id=job_id,
            kind="warm",
            phase="verify",
            previous="fetch",
            previous_duration=2.5,
        )
    )


def test_a_job_is_running_until_it_finishes_then_counted_by_status(broker: Broker) -> None:
    """jobs_running{kind} is 1 between JobStarted and JobFinished and 0 after; jobs_total
    counts the job once under its final status."""
    metrics = Metrics(broker, CollectorRegistry())
    run_warm_job(broker)
    assert sample(metrics, "tokenbroker_jobs_running", kind="warm") == 1
    assert sample(metrics, "tokenbroker_jobs_total", kind="warm", status="partial") is None
    broker.events.emit(
        JobFinished(
            provider="pool", job_id=JOB, kind="warm", status="partial", phase="verify",
            phase_duration=0.2, ok=3, failed=1,
        )
    )  # fmt: skip
    assert sample(metrics, "tokenbroker_jobs_running", kind="warm") == 0
    assert sample(metrics, "tokenbroker_jobs_total", kind="warm", status="partial") == 1


def test_phase_durations_and_item_outcomes_are_recorded_per_kind(broker: Broker) -> None:
    """Each phase's duration lands in its own histogram series (the last one from
    JobFinished), and items are counted by outcome."""
    metrics = Metrics(broker, CollectorRegistry())
    run_warm_job(broker, failures=1)
    broker.events.emit(
        JobFinished(
            provider="pool", job_id=JOB, kind="warm", status="partial", phase="verify",
            phase_duration=0.2,
        )
    )  # fmt: skip
    name = "tokenbroker_job_phase_duration_seconds"
    assert sample(metrics, f"{name}_count", kind="warm", phase="resolve") == 1
    assert sample(metrics, f"{name}_sum", kind="warm", phase="fetch") == 2.5
    assert sample(metrics, f"{name}_sum", kind="warm", phase="verify") == 0.2
    assert sample(metrics, f"{name}_bucket", kind="warm", phase="fetch", le="1.0") == 0
    assert sample(metrics, f"{name}_bucket", kind="warm", phase="fetch", le="5.0") == 1
    assert sample(metrics, "tokenbroker_job_items_total", kind="warm", outcome="ok") == 3
    assert sample(metrics, "tokenbroker_job_items_total", kind="warm", outcome="failed") == 1


def test_a_finish_without_a_start_here_never_drives_running_below_zero(broker: Broker) -> None:
    """A reaper ending another instance's lost job, a queued job canceled, and a repeated
    JobFinished count in jobs_total but leave jobs_running at its true value."""
    metrics = Metrics(broker, CollectorRegistry())
    broker.events.emit(JobStarted(job_id="job_a", kind="rotate_key"))
    broker.events.emit(JobStarted(job_id="job_a", kind="rotate_key"))  # published twice
    lost = JobFinished(job_id="job_b", kind="rotate_key", status="failed", error_type="worker_lost")
    broker.events.emit(lost)
    broker.events.emit(lost)
    assert sample(metrics, "tokenbroker_jobs_running", kind="rotate_key") == 1
    assert sample(metrics, "tokenbroker_jobs_total", kind="rotate_key", status="failed") == 2
    done = JobFinished(job_id="job_a", kind="rotate_key", status="done")
    broker.events.emit(done)
    broker.events.emit(done)
    assert sample(metrics, "tokenbroker_jobs_running", kind="rotate_key") == 0


def test_concurrent_jobs_on_many_threads_are_all_counted(broker: Broker) -> None:
    """8 threads each running 50 jobs leave jobs_total = 400, items = 1,600 and running = 0."""
    metrics = Metrics(broker, CollectorRegistry())

    def worker(n: int) -> None:
        for j in range(50):
            job_id = f"job_{n}_{j}"
            run_warm_job(broker, job_id=job_id, failures=0)
            broker.events.emit(JobFinished(job_id=job_id, kind="warm", status="done"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sample(metrics, "tokenbroker_jobs_total", kind="warm", status="done") == 400
    assert sample(metrics, "tokenbroker_job_items_total", kind="warm", outcome="ok") == 1600
    assert sample(metrics, "tokenbroker_jobs_running", kind="warm") == 0


def test_sse_streams_are_read_from_the_given_count_at_scrape_time(broker: Broker) -> None:
    """tokenbroker_sse_streams is 0 until a count is wired, then follows it on every scrape."""
    metrics = Metrics(broker, CollectorRegistry())
    assert sample(metrics, "tokenbroker_sse_streams") == 0
    open_streams = [3]
    metrics.count_streams(lambda: open_streams[0])
    assert sample(metrics, "tokenbroker_sse_streams") == 3
    open_streams[0] = 0
    assert sample(metrics, "tokenbroker_sse_streams") == 0


def test_job_labels_carry_no_job_id_item_or_provider(broker: Broker) -> None:
    """No job id, item name or error reason appears anywhere in the exposition text, and the
    job series have exactly the labels kind, status, phase, outcome (plus le)."""
    metrics = Metrics(broker, CollectorRegistry())
    run_warm_job(broker)
    broker.events.emit(JobFinished(job_id=JOB, kind="warm", status="partial", error_type="x"))
    text = metrics.render().decode()
    for secret in (JOB, ITEM, "invalid_grant", "pool"):
        assert secret not in text
    labels = set()
    for line in text.splitlines():
        if line.startswith(("tokenbroker_job", "tokenbroker_sse")) and "{" in line:
            labels.update(re.findall(r'(\w+)="', line))
    assert labels == {"kind", "status", "phase", "outcome", "le"}


def test_closed_metrics_stop_counting_job_events(broker: Broker) -> None:
    """After close(), job events published on the broker change nothing."""
    metrics = Metrics(broker, CollectorRegistry())
    metrics.close()
    run_warm_job(broker)
    assert sample(metrics, "tokenbroker_job_items_total", kind="warm", outcome="ok") is None
