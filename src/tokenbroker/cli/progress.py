"""A job's events shown to a person: progress bars on a terminal, plain lines elsewhere.

:func:`watch` consumes any iterable of :mod:`tokenbroker.jobs.events` records (a list in
tests, the SSE client's iterator in ``tokenbroker jobs watch``) and returns the
:class:`JobView` it ended with. Two renderings of the same view:

* **Terminal** (``rich``): one bar per phase, in the order the phases came. The current
  phase's bar shows the job's weighted progress (the ``progress`` of ``phase_update``) and
  its item counts; a phase that has ended is shown at 100 %. Failed items are printed above
  the bars as they come. A final line states the outcome.
* **Plain** (stdout is not a TTY, or ``rich`` is not installed): a line per phase change,
  a line each time progress crosses a multiple of 10 %, a line per failed item and a final
  line — never a line per item: 10,000 item updates give at most ~15 lines.

Either way at most ``max_failed_listed`` failed items are listed; the final line counts
them all. Text from the server (phase, item, reason, error) is printed with every control
character escaped (:func:`tokenbroker.telemetry.logs.escape`), so a crafted item name can
neither forge a line nor send terminal commands.

Exit codes (:func:`exit_code`) for commands that follow a job: **0** done, **1** failed,
**2** partial or canceled (some or all of the work was not done, nothing broke).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, TextIO

from ..jobs.events import Canceled, Completed, Failed, ItemFailed, JobEvent, PhaseUpdate
from ..jobs.model import FailedItem, ItemCounts, JobError, JobStatus
from ..telemetry.logs import escape

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["EXIT_CODES", "JobView", "PlainRenderer", "RichRenderer", "exit_code", "watch"]

#: The exit code of a command that followed a job to its final status.
EXIT_CODES: Mapping[JobStatus, int] = MappingProxyType(
    {JobStatus.DONE: 0, JobStatus.FAILED: 1, JobStatus.PARTIAL: 2, JobStatus.CANCELED: 2}
)
#: Failed items listed by default before the rest are only counted.
MAX_FAILED_LISTED = 100


def exit_code(status: JobStatus) -> int:
    """The exit code for a job that ended in ``status``: 0 done, 1 failed, 2 partial or
    canceled.

    Raises:
        ValueError: For a status that is not final (the stream ended before the job did).
    """
    try:
        return EXIT_CODES[status]
    except KeyError:
        raise ValueError(f"job status {status.value} is not final") from None


@dataclass
class JobView:
    """What a person knows about a job from the events seen so far.

    Attributes:
        job_id: The job (None before the first event).
        phases: The phases seen, in order.
        progress: The job's weighted progress, 0-100.
        items: The latest item counts.
        failed: The failed items seen, in order.
        status: The final status once a final event came; None until then.
        error: Why the job failed, for ``failed``.
    """

    job_id: str | None = None
    phases: list[str] = field(default_factory=list)
    progress: float = 0.0
    items: ItemCounts = field(default_factory=ItemCounts)
    failed: list[FailedItem] = field(default_factory=list)
    status: JobStatus | None = None
    error: JobError | None = None

    @property
    def phase(self) -> str | None:
        """The current (last seen) phase."""
        return self.phases[-1] if self.phases else None

    def apply(self, event: JobEvent) -> bool:
        """Take one event in; a heartbeat changes nothing.

        Returns:
            True when ``event`` entered a new phase.
        """
        self.job_id = event.job_id
        new_phase = False
        if isinstance(event, PhaseUpdate):
            if event.phase != self.phase:
                self.phases.append(event.phase)
                new_phase = True
            self.progress = max(self.progress, event.progress)
            self.items = event.items
        elif isinstance(event, ItemFailed):
            self.failed.append(FailedItem(event.item, event.reason, event.retryable))
        elif isinstance(event, Completed):
            self.status, self.progress = event.status, 100.0
        elif isinstance(event, Failed):
            self.status, self.error = JobStatus.FAILED, event.error
        elif isinstance(event, Canceled):
            self.status = JobStatus.CANCELED
        return new_phase

    def counts(self) -> str:
        """The item counts in words: ``630/1000 ok, 5 failed``."""
        text = f"{self.items.ok}/{self.items.total} ok"
        failed = max(self.items.failed, len(self.failed))
        return f"{text}, {failed} failed" if failed else text

    def outcome(self) -> str:
        """The final line: ``job ID STATUS: …`` (``still running`` before a final event)."""
        job = escape(self.job_id or "?")
        if self.status is None:
            return f"job {job} still running at {self.progress:.0f}%: {self.counts()}"
        line = f"job {job} {self.status.value}: {self.counts()}"
        if self.status is JobStatus.FAILED and self.error is not None:
            line += f"; {escape(self.error.type)}: {escape(self.error.message)}"
        elif self.status is JobStatus.CANCELED:
            line += f" (stopped at {self.progress:.0f}%)"
        if any(item.retryable for item in self.failed):
            line += f"; retry the failed items with: tokenbroker jobs retry {job}"
        return line


_MORE_FAILED = "(more failed items: counted in the final line, not listed)"


def _failure_line(item: FailedItem) -> str:
    retry = "retryable" if item.retryable else "not retryable"
    return f"failed: {escape(item.item)}: {escape(item.reason)} ({retry})"


class PlainRenderer:
    """Plain lines for logs and pipes (see the module docstring for which lines).

    Args:
        write: Called with each line (without a newline).
        max_failed_listed: Failed items printed before the rest are only counted.
    """

    def __init__(
        self, write: Callable[[str], None], max_failed_listed: int = MAX_FAILED_LISTED
    ) -> None:
        self.view = JobView()
        self._write = write
        self._max_failed = max_failed_listed
        self._decile = 0

    def show(self, event: JobEvent) -> None:
        """Print what ``event`` changed, if it is worth a line."""
        view = self.view
        if view.apply(event):
            self._decile = int(view.progress // 10)
            self._write(f"phase {escape(view.phase or '')}: {view.progress:.0f}%, {view.counts()}")
        elif isinstance(event, PhaseUpdate) and view.progress // 10 > self._decile:
            self._decile = int(view.progress // 10)
            self._write(f"{escape(event.phase)} {view.progress:.0f}%: {view.counts()}")
        elif isinstance(event, ItemFailed):
            if len(view.failed) <= self._max_failed:
                self._write(_failure_line(view.failed[-1]))
            elif len(view.failed) == self._max_failed + 1:
                self._write(_MORE_FAILED)
        if view.status is not None:
            self._write(view.outcome())

    def close(self) -> None:
        """Print the outcome line if the stream ended before a final event."""
        if self.view.status is None and self.view.job_id is not None:
            self._write(self.view.outcome())


class RichRenderer:
    """Progress bars on a terminal, one per phase (see the module docstring).

    Args:
        console: Where to draw (``Console(file=…, force_terminal=True)`` in tests).
        max_failed_listed: Failed items printed before the rest are only counted.
        refresh_per_second: How often the bars are redrawn.
    """

    def __init__(
        self,
        console: Console,
        max_failed_listed: int = MAX_FAILED_LISTED,
        refresh_per_second: float = 8,
    ) -> None:
        from rich.progress import (  # noqa: PLC0415 - rich is only needed on a terminal
            BarColumn,
            Progress,
            TaskID,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.view = JobView()
        self.console = console
        self._max_failed = max_failed_listed
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[items]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=refresh_per_second,
        )
        self._tasks: list[TaskID] = []
        self._progress.start()

    def show(self, event: JobEvent) -> None:
        """Move the bars, print a failed item, or end with the outcome line."""
        from rich.text import Text  # noqa: PLC0415 - see __init__

        view = self.view
        progress = self._progress
        if view.apply(event):
            if self._tasks:
                progress.update(self._tasks[-1], completed=100)
            task = progress.add_task(
                escape(view.phase or ""),
                total=100,
                completed=int(view.progress),
                items=view.counts(),
            )
            self._tasks.append(task)
        if isinstance(event, PhaseUpdate) and self._tasks:
            progress.update(self._tasks[-1], completed=view.progress, items=view.counts())
        elif isinstance(event, ItemFailed):
            if len(view.failed) <= self._max_failed:
                progress.console.print(Text(_failure_line(view.failed[-1]), style="red"))
            elif len(view.failed) == self._max_failed + 1:
                progress.console.print(Text(_MORE_FAILED))
        if view.status is JobStatus.DONE or view.status is JobStatus.PARTIAL:
            for task in self._tasks:
                progress.update(task, completed=100)
        if view.status is not None:
            self.close()

    def close(self) -> None:
        """Draw the bars a last time, stop redrawing and print the outcome line (once)."""
        from rich.text import Text  # noqa: PLC0415 - see __init__

        if not self._progress.live.is_started:
            return
        self._progress.stop()
        if self.view.job_id is not None:
            styles = {JobStatus.DONE: "green", JobStatus.FAILED: "bold red"}
            style = styles.get(self.view.status, "yellow") if self.view.status else ""
            self.console.print(Text(self.view.outcome(), style=style))


def watch(
    events: Iterable[JobEvent],
    *,
    out: TextIO | None = None,
    console: Console | None = None,
    max_failed_listed: int = MAX_FAILED_LISTED,
) -> JobView:
    """Show a job's events until the final one (or until ``events`` ends).

    Args:
        events: The job's events in order (heartbeats are ignored).
        out: Where plain lines go, default ``sys.stdout``; when it is a terminal and rich is
            installed, bars are drawn on it instead.
        console: Draw bars on this rich console (overrides ``out``).
        max_failed_listed: Failed items listed before the rest are only counted.

    Returns:
        The view at the end: ``status`` is the final status, or None if the events ended
        first (pass a final status to :func:`exit_code`).
    """
    renderer: PlainRenderer | RichRenderer
    stream = out if out is not None else sys.stdout
    if console is None and stream.isatty():
        try:
            from rich.console import Console  # noqa: PLC0415 - optional (server extra)
        except ImportError:  # pragma: no cover - rich ships with the server extra
            pass
        else:
            console = Console(file=stream)
    if console is not None:
        renderer = RichRenderer(console, max_failed_listed)
    else:
        renderer = PlainRenderer(
            lambda line: print(line, file=stream, flush=True), max_failed_listed
        )
    try:
        for event in events:
            renderer.show(event)
            if renderer.view.status is not None:
                break
    finally:
        renderer.close()
    return renderer.view
