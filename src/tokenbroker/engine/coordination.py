"""Change notices between brokers: what the engine needs from a coordinator (cluster mode).

A :class:`Coordinator` carries *notices* — "credential row X changed", "the stored
consumers changed" — so that code waiting for such a change wakes within milliseconds
instead of polling blindly. A notice is only a hint to look again: it may arrive late,
twice, or never (Redis pub/sub loses what is published while a subscriber reconnects).
So every waiter re-reads the store after a wake-up *and* after a short timeout, and the
store's fenced lease stays the only thing that decides who refreshes. A coordinator never
decides anything.

:class:`LocalCoordinator` delivers notices inside one process (the in-process default,
and the local half of :class:`tokenbroker.cluster.RedisCoordinator`). The engine never
imports Redis: the broker is handed a coordinator, or builds one from ``settings.redis``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, runtime_checkable

__all__ = [
    "CONSUMERS",
    "Coordinator",
    "LocalCoordinator",
    "SharedLimits",
    "Watch",
    "credential_topic",
]

#: The topic of "the stored consumers changed" (added, removed).
CONSUMERS = "consumers"


def credential_topic(row_id: str) -> str:
    """The topic of "credential row ``row_id`` changed or its lease was released"."""
    return f"credential:{row_id}"


class Watch:
    """One waiter's interest in a topic: :meth:`wait` returns once a notice arrived since the
    last :meth:`wait` (or since the watch began), or after ``timeout``."""

    __slots__ = ("_event", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._event = threading.Event()

    def __repr__(self) -> str:
        return f"Watch(topic={self.topic!r}, notified={self._event.is_set()})"

    def notify(self) -> None:
        """Wake the waiter (called by the coordinator)."""
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Block until a notice or ``timeout`` seconds.

        Returns:
            True if a notice woke it; False on timeout. Either way: re-read the store.
        """
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken


class Coordinator(Protocol):
    """Fans change notices out to waiters, in this process and (cluster mode) in others.

    Contract: :meth:`publish` never blocks on the network and never raises; :meth:`watch`
    registers its waiter *before* returning, so a notice published after that is not lost in
    this process; :meth:`degraded` names why notices may not reach other processes.
    """

    def publish(self, topic: str) -> None:
        """Announce a change of ``topic`` to every watcher, here and elsewhere."""

    def watch(self, topic: str) -> AbstractContextManager[Watch]:
        """A context manager: a :class:`Watch` on ``topic`` for the duration of the block."""

    def degraded(self) -> str | None:
        """Why notices may not reach other processes right now, or None when they do."""

    def close(self) -> None:
        """Stop delivering notices and release connections."""


@runtime_checkable
class SharedLimits(Protocol):
    """Limits the engine counts across processes, and "token dropped" fan-out (cluster mode).

    Every method may raise :class:`~tokenbroker.errors.CoordinationUnavailableError`; the
    caller then applies its own process's limit (a limit may loosen while Redis is away, the
    service never stops). Names are opaque to the implementation and carry no secret.
    """

    def claim(self, name: str, seconds: float) -> bool:
        """Take ``name`` for ``seconds`` unless another process (or this one) holds it.

        Returns:
            True if taken now; False if it was already held.
        """

    def admit(self, name: str, member: str, seed: str, limit: int) -> bool:
        """Add ``member`` to the set ``name`` (which always holds ``seed``) unless the set
        already has ``limit`` members and ``member`` is not one of them.

        Returns:
            True if ``member`` is (now) in the set; False if the set is full.
        """

    def dropped(self, name: str, digest: str) -> None:
        """Tell every other process that the token with ``digest`` of key ``name`` was
        dropped; fire-and-forget, never raises."""

    def on_dropped(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(name, digest)`` for every "dropped" notice (from any process)."""


class LocalCoordinator:
    """Notices within one process: a dictionary of watches by topic, under a lock."""

    def __init__(self) -> None:
        self._watches: dict[str, set[Watch]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalCoordinator(topics={len(self._watches)})"

    def publish(self, topic: str) -> None:
        """Wake every watch on ``topic`` in this process."""
        with self._lock:
            watches = list(self._watches.get(topic, ()))
        for watch in watches:
            watch.notify()

    def wake_all(self) -> None:
        """Wake every watch (after a gap in which notices from elsewhere may have been lost)."""
        with self._lock:
            watches = [w for group in self._watches.values() for w in group]
        for watch in watches:
            watch.notify()

    @contextmanager
    def watch(self, topic: str) -> Iterator[Watch]:
        """A :class:`Watch` on ``topic`` while the block runs."""
        watch = Watch(topic)
        with self._lock:
            self._watches.setdefault(topic, set()).add(watch)
        try:
            yield watch
        finally:
            with self._lock:
                group = self._watches.get(topic)
                if group is not None:
                    group.discard(watch)
                    if not group:
                        del self._watches[topic]

    def degraded(self) -> str | None:
        """Never degraded: there is no one else to reach."""
        return None

    def close(self) -> None:
        """Nothing to release."""
