"""``GET /v1/events``: the broker's status events over Server-Sent Events (issue 18 §2).

The events of :class:`~tokenbroker.api.status_feed.StatusFeed`: ``provider``, ``pool``,
``job`` and ``service`` events, each one item's whole state (never a token, secret or key),
coalesced to at most one per item per second, with the resume, heartbeat and lifetime
contract of :mod:`tokenbroker.api.sse`. A request without ``Last-Event-ID`` starts with the
current state of every item.

Who: a consumer with the ``admin`` rule, by ``Authorization: Bearer KEY`` or by the status
page's session cookie (``EventSource`` cannot send headers). No or a wrong key and no valid
session: 401; a key or session without ``admin``: 403. Both are decided before the stream
starts.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..access import authenticate
from ..errors import NO_STORE, RateLimited, Unauthorized, error_response
from ..sse import StreamGauge, StreamLimits, event_stream
from ..status_feed import StatusFeed
from ..ui.routes import page_session

__all__ = ["add_routes"]

FORBIDDEN = {"error": {"code": "forbidden", "message": "the admin permission is required"}}


def _refusal(request: Request) -> Response | None:
    """None when the caller may follow the events, else the 401 or 403 answer."""
    header = request.headers.get("authorization")
    if header is None:
        if page_session(request) is not None:
            return None
        return error_response(Unauthorized(presented=False))
    kind, _, key = header.partition(" ")
    source = request.client.host if request.client else "unknown"
    try:
        consumer = authenticate(
            request.app.state.consumers,
            request.app.state.limits,
            key.strip() if kind.lower() == "bearer" else None,
            source,
        )
    except (Unauthorized, RateLimited) as exc:
        return error_response(exc)
    if not consumer.is_admin():
        return JSONResponse(FORBIDDEN, status_code=403, headers=NO_STORE)
    return None


def add_routes(
    app: FastAPI, feed: StatusFeed, gauge: StreamGauge | None = None, heartbeat: float = 5.0
) -> None:
    """Add ``GET /v1/events`` to ``app``.

    Args:
        app: The API (its ``state.consumers``, ``state.limits``, ``state.sessions`` set).
        feed: The status feed.
        gauge: Counts the open streams (``tokenbroker_sse_streams``).
        heartbeat: Seconds between heartbeat events.
    """
    limits = StreamLimits(heartbeat_seconds=heartbeat)

    @app.get("/v1/events", include_in_schema=False)
    async def events(request: Request) -> Response:
        refused = _refusal(request)
        if refused is not None:
            return refused
        return await event_stream(request, feed, limits=limits, gauge=gauge)
