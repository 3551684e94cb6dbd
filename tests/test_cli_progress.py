"""What a person sees while following a job (issue 16 item 10): rich bars on a terminal,
bounded plain lines elsewhere, failed items named, one outcome line, and the exit codes."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest
from rich.console import Console

from tokenbroker.cli.progress import exit_code, watch
from tokenbroker.jobs.events import (
    Canceled,
    Completed,
    Failed,
    Heartbeat,
    ItemFailed,
    JobEvent,
    PhaseUpdate,
)
from tokenbroker.jobs.model import ItemCounts, JobError, JobStatus

JOB = "job_Zq3xXb1mQ9YpV7cN2wK4rA"
PHASES = (("resolve", 10.0), ("fetch", 80.0), ("verify", 10.0))
CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def warm_job(total: int, failed: dict[int, str], end: JobEvent | None = None) -> Iterator[JobEvent]:
    """A warm job's events, uncoalesced: one phase_update per item of the fetch phase (the
    worst case a renderer must survive), an item_failed for each index in ``failed``, a
    heartbeat now and then, and ``end`` (default: completed, partial if anything failed)."""
    ts = 1_700_000_000.0
    yield PhaseUpdate(job_id=JOB, phase="resolve", progress=0.0, items=ItemCounts(total), ts=ts)
    yield PhaseUpdate(job_id=JOB, phase="fetch", progress=10.0, items=ItemCounts(total), ts=ts)
    ok = bad = 0
    for n in range(total):
        if n in failed:
            bad += 1
            yield ItemFailed(
                job_id=JOB, item=failed[n], reason="invalid_grant", retryable=n % 2 == 0
            )
        else:
            ok += 1
        items = ItemCounts(total, ok, bad)
        yield PhaseUpdate(
            job_id=JOB, phase="fetch", progress=10 + 80 * (n + 1) / total, items=items, ts=ts
        )
        if n % 1000 == 0:
            yield Heartbeat(job_id=JOB, status=JobStatus.RUNNING, ts=ts)
    yield PhaseUpdate(job_id=JOB, phase="verify", progress=90.0, items=items, ts=ts)
    status = JobStatus.PARTIAL if failed else JobStatus.DONE
    yield end or Completed(job_id=JOB, status=status)


def plain_lines(events: Iterator[JobEvent], **options: int) -> tuple[list[str], JobStatus | None]:
    """Watch ``events`` with a non-terminal output; its lines and the final status."""
    out = io.StringIO()
    view = watch(events, out=out, **options)
    return out.getvalue().splitlines(), view.status


def rich_screen(events: Iterator[JobEvent]) -> tuple[str, JobStatus | None]:
    """Watch ``events`` on a rich terminal console writing to a buffer; the text written
    (escape sequences removed) and the final status."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120, color_system="standard")
    view = watch(events, console=console)
    return CSI.sub("", buffer.getvalue()), view.status


def last_bar(screen: str, phase: str) -> str:
    """The last drawn row of ``phase``'s bar."""
    rows = [row for row in re.split(r"[\r\n]", screen) if row.startswith(phase + " ")]
    assert rows, f"no bar for {phase}"
    return rows[-1]


def test_plain_mode_prints_a_bounded_number_of_lines_for_10000_items() -> None:
    """10,000 item updates give at most 3 phase lines + 10 progress lines + 2 failures + 1
    outcome, the failed items named, and exactly one final line."""
    lines, status = plain_lines(warm_job(10_000, {17: "alice", 9_000: "bob"}))
    assert len(lines) <= 16, lines
    assert [line for line in lines if line.startswith("phase ")] == [
        "phase resolve: 0%, 0/10000 ok",
        "phase fetch: 10%, 0/10000 ok",
        "phase verify: 90%, 9998/10000 ok, 2 failed",
    ]
    assert "failed: alice: invalid_grant (not retryable)" in lines
    assert "failed: bob: invalid_grant (retryable)" in lines
    finals = [line for line in lines if line.startswith(f"job {JOB} ")]
    assert finals == [
        f"job {JOB} partial: 9998/10000 ok, 2 failed; "
        f"retry the failed items with: tokenbroker jobs retry {JOB}"
    ]
    assert lines[-1] == finals[0]
    assert status is JobStatus.PARTIAL and exit_code(status) == 2


def test_plain_mode_lists_at_most_the_cap_of_failed_items_but_counts_them_all() -> None:
    """500 failed items with a cap of 20 print 20 item lines and one 'more' line; the final
    line counts all 500."""
    failed = {n: f"user{n}" for n in range(0, 1000, 2)}
    lines, status = plain_lines(warm_job(1000, failed), max_failed_listed=20)
    assert len([line for line in lines if line.startswith("failed: user")]) == 20
    assert len([line for line in lines if line.startswith("(more failed items")]) == 1
    assert lines[-1].startswith(f"job {JOB} partial: 500/1000 ok, 500 failed")
    assert status is JobStatus.PARTIAL


def test_rich_bars_reach_100_failed_items_are_named_once_and_one_final_line() -> None:
    """On a terminal every phase's bar ends at 100% with the item counts, each failed item is
    printed exactly once above the bars, and the outcome line appears once."""
    screen, status = rich_screen(warm_job(2_000, {5: "alice", 1_500: "bob"}))
    for phase, _ in PHASES:
        assert "100%" in last_bar(screen, phase), last_bar(screen, phase)
    assert "1998/2000 ok, 2 failed" in last_bar(screen, "verify")
    assert screen.count("failed: alice: invalid_grant (not retryable)") == 1
    assert screen.count("failed: bob: invalid_grant (retryable)") == 1
    assert screen.count(f"job {JOB} partial: 1998/2000 ok, 2 failed") == 1
    assert status is JobStatus.PARTIAL


def test_a_done_job_exits_0() -> None:
    """A job without failures ends 'done' with every item ok, exit code 0, in both modes."""
    screen, status = rich_screen(warm_job(100, {}))
    assert screen.count(f"job {JOB} done: 100/100 ok") == 1
    assert status is JobStatus.DONE and exit_code(status) == 0
    lines, status = plain_lines(warm_job(100, {}))
    assert lines[-1] == f"job {JOB} done: 100/100 ok"


def test_a_failed_job_stops_its_bar_where_it_was_and_names_the_error() -> None:
    """A job that fails as a whole leaves the current bar below 100%, prints the error type
    and message once, and exits 1."""
    error = JobError("worker_lost", "the instance running it stopped")
    events = list(warm_job(1000, {}))
    cut = [e for e in events[:600] if not e.final] + [Failed(job_id=JOB, error=error)]
    screen, status = rich_screen(iter(cut))
    assert "100%" not in last_bar(screen, "fetch")
    assert screen.count("worker_lost: the instance running it stopped") == 1
    assert status is JobStatus.FAILED and exit_code(status) == 1


def test_a_canceled_job_says_where_it_stopped_and_exits_2() -> None:
    """A canceled job's final line says canceled and the progress it stopped at; exit 2."""
    events = list(warm_job(100, {}))[:52]  # 49 of 100 items done
    events.append(Canceled(job_id=JOB, ts=1_700_000_001.0))
    lines, status = plain_lines(iter(events))
    assert lines[-1].startswith(f"job {JOB} canceled: ")
    assert lines[-1] == f"job {JOB} canceled: 49/100 ok (stopped at 49%)"
    assert status is JobStatus.CANCELED and exit_code(status) == 2


def test_events_after_the_final_one_are_not_read() -> None:
    """watch stops at the final event: a later event is never consumed."""
    consumed: list[JobEvent] = []

    def events() -> Iterator[JobEvent]:
        for event in warm_job(10, {}):
            consumed.append(event)
            yield event
        consumed.append(PhaseUpdate(job_id=JOB, phase="x", progress=0, items=ItemCounts(), ts=0))
        yield consumed[-1]

    lines, _ = plain_lines(events())
    assert consumed[-1].final
    assert lines[-1] == f"job {JOB} done: 10/10 ok"


def test_a_stream_that_ends_early_says_the_job_is_still_running() -> None:
    """Without a final event the status stays None, the last line says 'still running', and
    exit_code refuses a status that is not final."""
    events = [e for e in list(warm_job(100, {}))[:30] if not e.final]
    lines, status = plain_lines(iter(events))
    assert status is None
    assert lines[-1].startswith(f"job {JOB} still running at ")
    with pytest.raises(ValueError, match="running is not final"):
        exit_code(JobStatus.RUNNING)


@pytest.mark.parametrize("mode", ["plain", "rich"])
def test_control_characters_from_the_server_are_escaped(mode: str) -> None:
    """An item name and reason carrying a newline, a forged line and terminal escape
    sequences print as visible escapes: no raw CR/LF/ESC/BEL reaches the output from them."""
    forged = "x\nfailed: admin: forged\r\x1b]0;pwned\x07\x1b[2J"
    events = [
        PhaseUpdate(job_id=JOB, phase="fetch\x1b[31m", progress=50, items=ItemCounts(2, 1), ts=0),
        ItemFailed(job_id=JOB, item=forged, reason=f"bad{forged}", retryable=False),
        Completed(job_id=JOB, status=JobStatus.PARTIAL),
    ]
    if mode == "plain":
        out = io.StringIO()
        watch(iter(events), out=out)
        text = out.getvalue()
        assert len(text.splitlines()) == 3
    else:
        buffer = io.StringIO()
        watch(iter(events), console=Console(file=buffer, force_terminal=True, width=300))
        text = buffer.getvalue()
    assert "pwned\x07" not in text and "\x1b]0" not in text and "\x1b[2J" not in text
    assert "fetch\x1b[31m" not in text
    assert not any(line.startswith("failed: admin") for line in re.split(r"[\r\n]", text))
    assert "x\\x0afailed: admin: forged\\x0d\\x1b]0;pwned\\x07\\x1b[2J" in CSI.sub("", text)
