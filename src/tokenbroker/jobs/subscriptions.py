"""Wake-ups for readers waiting on a job (the SSE stream, ``jobs watch``).

A reader subscribes to one job (or to every job), awaits :meth:`Subscription.wait`, and
re-reads the store when woken: a wake-up says "something changed", never what, so a
missed or merged wake-up loses nothing (writes by other processes are found by the
reader's own polling timeout). :meth:`Subscription.close` frees the subscription at once
(the hub's count drops), so a client that disconnects holds nothing. Notifying is
thread-safe: the runner's store writes finish in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType

__all__ = ["Subscription", "SubscriptionHub"]


class Subscription:
    """One reader's wake-up for one job (``job_id`` None: every job). Use it in a ``with``
    block, or call :meth:`close`."""

    def __init__(self, hub: SubscriptionHub, job_id: str | None) -> None:
        self.job_id = job_id
        self._hub = hub
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self.closed = False

    def __repr__(self) -> str:
        return f"Subscription(job_id={self.job_id!r}, closed={self.closed})"

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for a change of the job (or until ``timeout`` seconds pass).

        Returns:
            True when woken by a change, False on timeout.
        """
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        self._event.clear()
        return True

    def close(self) -> None:
        """Unsubscribe now (idempotent)."""
        if not self.closed:
            self.closed = True
            self._hub._remove(self)

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the reader's loop has closed
            self._loop.call_soon_threadsafe(self._event.set)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SubscriptionHub:
    """The subscriptions of one process, by job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[str | None, set[Subscription]] = {}

    def __len__(self) -> int:
        """How many subscriptions are open."""
        with self._lock:
            return sum(len(s) for s in self._by_job.values())

    def __repr__(self) -> str:
        return f"SubscriptionHub(open={len(self)})"

    def subscribe(self, job_id: str | None = None) -> Subscription:
        """A new subscription, bound to the running event loop.

        Raises:
            RuntimeError: When no event loop is running.
        """
        subscription = Subscription(self, job_id)
        with self._lock:
            self._by_job.setdefault(job_id, set()).add(subscription)
        return subscription

    def notify(self, job_id: str) -> None:
        """Wake every subscription of ``job_id`` and every all-jobs subscription."""
        with self._lock:
            woken = [*self._by_job.get(job_id, ()), *self._by_job.get(None, ())]
        for subscription in woken:
            subscription._wake()

    def _remove(self, subscription: Subscription) -> None:
        with self._lock:
            subs = self._by_job.get(subscription.job_id)
            if subs is not None:
                subs.discard(subscription)
                if not subs:
                    del self._by_job[subscription.job_id]
