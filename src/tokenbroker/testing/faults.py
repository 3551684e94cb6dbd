"""Transport-level fault injection for the test authorization server.

A :class:`Fault` describes how to misbehave for one request: wait, answer a canned
status and body, or close the connection without answering. :class:`FaultQueue` is the
thread-safe FIFO the server consumes one fault per matching request from.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from tokenbroker.testing.messages import Reply

__all__ = ["ANY_PATH", "Fault", "FaultQueue"]

#: Pass as ``path`` to make a fault match a request for any path.
ANY_PATH = None


@dataclass(frozen=True)
class Fault:
    """How to misbehave for one request.

    Attributes:
        status: Answer this status code with ``body`` instead of the real reply. ``None``
            means answer normally (after ``delay``).
        body: The canned body sent with ``status``.
        headers: Extra header fields sent with ``status``; ``Content-Type`` defaults to
            ``application/json``.
        delay: Seconds to sleep before answering (or before dropping).
        drop: Close the connection without sending any response.
    """

    status: int | None = None
    body: str | bytes = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False

    def __post_init__(self) -> None:
        """Reject faults that would do nothing or contradict themselves.

        Raises:
            ValueError: Neither status, delay nor drop is set; drop is combined with a
                status; delay is negative; or status is not a valid HTTP status.
        """
        if self.delay < 0:
            raise ValueError("Fault.delay must be >= 0")
        if self.drop and self.status is not None:
            raise ValueError("Fault.drop cannot be combined with a status")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError("Fault.status must be an HTTP status code (100-599)")
        if self.status is None and not self.drop and self.delay == 0:
            raise ValueError("a Fault needs a status, a delay or drop=True")

    def reply(self) -> Reply | None:
        """Build the canned reply.

        Returns:
            The reply to send, or ``None`` when the fault answers normally or drops.
        """
        if self.status is None:
            return None
        return Reply.json(self.status, self.body, self.headers.items())


@dataclass
class _Entry:
    fault: Fault
    remaining: int | None
    path: str | None


class FaultQueue:
    """A thread-safe FIFO of faults, each armed for a number of matching requests."""

    def __init__(self) -> None:
        """Create an empty queue."""
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []

    def push(self, fault: Fault, times: int | None, path: str | None) -> None:
        """Arm a fault at the back of the queue.

        Args:
            fault: The fault to apply.
            times: How many matching requests it applies to; ``None`` means until
                :meth:`clear`.
            path: Only requests for this exact path match; ``None`` matches any path.

        Raises:
            ValueError: ``times`` is less than 1.
        """
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 (or None for 'until cleared')")
        with self._lock:
            self._entries.append(_Entry(fault, times, path))

    def take(self, path: str) -> Fault | None:
        """Consume the oldest fault armed for ``path``.

        Args:
            path: The path of the request being served.

        Returns:
            The fault to apply, or ``None`` when no armed fault matches.
        """
        with self._lock:
            for index, entry in enumerate(self._entries):
                if entry.path is not None and entry.path != path:
                    continue
                if entry.remaining is not None:
                    entry.remaining -= 1
                    if entry.remaining == 0:
                        del self._entries[index]
                return entry.fault
        return None

    def clear(self) -> None:
        """Disarm every pending fault."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        """Count the armed entries.

        Returns:
            The number of entries still in the queue.
        """
        with self._lock:
            return len(self._entries)
