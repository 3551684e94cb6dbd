"""A small in-memory event source and an app streaming it, for the SSE tests.

The source is generic (not the job code): numbered ``note`` events and a final ``end``
event, stored first and then published to every subscriber, as the
:class:`tokenbroker.api.sse.EventSource` contract asks. Events are published through the
app (``POST /streams/{name}/events``), so everything touching the source runs on the
server's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response

from tokenbroker.api.sse import StreamEvent, StreamGauge, StreamLimits, event_stream
from tokenbroker.jobs.events import sse_frame

KEY = "stream-key"


@dataclass(frozen=True)
class Note:
    """One stored event."""

    seq: int
    text: str
    final: bool = False

    def to_sse(self) -> str:
        return sse_frame("end" if self.final else "note", json.dumps({"text": self.text}), self.seq)


class NoteSubscription:
    """A subscriber's queue of live events and the stream's wake-up."""

    def __init__(self, source: NoteSource, wake: Callable[[], None]) -> None:
        self._source = source
        self._wake = wake
        self.queue: collections.deque[Note] = collections.deque()

    def push(self, note: Note) -> None:
        self.queue.append(note)
        self._wake()

    def pop(self) -> StreamEvent | None:
        return self.queue.popleft() if self.queue else None

    def close(self) -> None:
        self._source.subscribers.discard(self)


@dataclass
class NoteSource:
    """Stored notes plus live subscribers; ``before_snapshot`` and ``after_snapshot`` run
    (once) inside :meth:`after`, around its read of the stored notes."""

    notes: list[Note] = field(default_factory=list)
    subscribers: set[NoteSubscription] = field(default_factory=set)
    subscribed: int = 0
    before_snapshot: Callable[[NoteSource], None] | None = None
    after_snapshot: Callable[[NoteSource], None] | None = None

    def subscribe(self, wake: Callable[[], None]) -> NoteSubscription:
        subscription = NoteSubscription(self, wake)
        self.subscribers.add(subscription)
        self.subscribed += 1
        return subscription

    async def after(self, last_id: int) -> Sequence[StreamEvent]:
        before, self.before_snapshot = self.before_snapshot, None
        if before is not None:
            before(self)
        snapshot = tuple(self.notes[last_id:])
        after, self.after_snapshot = self.after_snapshot, None
        if after is not None:
            after(self)
        return snapshot

    async def delivered(self, last_id: int) -> bool:
        return bool(self.notes) and self.notes[-1].final and last_id >= len(self.notes)

    def store(self, text: str, final: bool = False) -> Note:
        note = Note(len(self.notes) + 1, text, final)
        self.notes.append(note)
        return note

    def publish(self, text: str, final: bool = False, *, deliver: bool = True) -> Note:
        """Store, then (unless ``deliver`` is False: a lost message) publish."""
        note = self.store(text, final)
        if deliver:
            for subscription in list(self.subscribers):
                subscription.push(note)
        return note


def stream_app(
    sources: dict[str, NoteSource], gauge: StreamGauge, limits: StreamLimits
) -> tuple[FastAPI, list[str | None]]:
    """The app, and the ``Last-Event-ID`` of every stream request it saw."""
    app = FastAPI()
    seen: list[str | None] = []

    def source_for(name: str, request: Request) -> NoteSource:
        # Decided in a dependency, before any stream starts.
        if request.headers.get("authorization") != f"Bearer {KEY}":
            raise HTTPException(401, "a valid key is required")
        if name not in sources:
            raise HTTPException(404, "no such stream")
        return sources[name]

    @app.get("/streams/{name}")
    # A default, not Annotated: the dependency is local and annotations are strings here.
    async def stream(
        request: Request,
        source: NoteSource = Depends(source_for),  # noqa: B008
    ) -> Response:
        seen.append(request.headers.get("last-event-id"))
        return await event_stream(request, source, limits=limits, gauge=gauge)

    @app.post("/streams/{name}/events")
    async def publish(name: str, body: dict[str, Any]) -> dict[str, int]:
        note = sources[name].publish(
            body["text"], body.get("final", False), deliver=body.get("deliver", True)
        )
        return {"seq": note.seq}

    @app.get("/tasks")
    async def tasks() -> dict[str, int]:
        return {"tasks": len(asyncio.all_tasks())}

    return app, seen
