"""Job routes (DESIGN §3.3, issue 16): start, list, read, follow, retry and cancel jobs.

=======  ===========================  =====================================================
Method   Path                         Answer
=======  ===========================  =====================================================
POST     /v1/jobs                     202 ``{job_id, status, cached, links: {self, stream}}``
GET      /v1/jobs                     ``{jobs: [...], next_cursor}``, newest first
GET      /v1/jobs/{id}                the job; an unknown id is 404 ``job_not_found``
GET      /v1/jobs/{id}/stream         Server-Sent Events (:mod:`tokenbroker.api.sse`)
POST     /v1/jobs/{id}/retry          202, a new job for the failed retryable items (409 if none)
POST     /v1/jobs/{id}/cancel         the job, ``canceling`` (or ``canceled`` if it was queued)
=======  ===========================  =====================================================

Permissions. A consumer needs the ``jobs`` word in its allow list; without it every jobs
route answers the 404 of an unknown route (the API it may not use does not exist for it,
as a provider it may not use does not). A job *spans* providers
(:meth:`~tokenbroker.jobs.kinds.JobKind.providers`: its ``provider`` param, else every
configured provider — ``rotate_key`` re-encrypts every secret — or, for ``keepalive``,
every idle-expiring provider); a consumer may start or see a job only when a token rule of
its allows every provider the job spans. Starting one that names a provider it may not use
(or an unknown one: indistinguishable) is 404 ``not_found``; a job id it may not see is 404
``job_not_found``, byte-identical to an unknown id.

Limits: a request body over the API's limit is 413; params over ``jobs.max_params_bytes``
400 ``invalid_job_params``; a consumer with ``jobs.max_running_per_consumer`` active jobs,
or a full queue (``jobs.max_queued`` waiting behind the instance's ``jobs.max_running``),
429 ``too_many_jobs`` with ``Retry-After``. Every job answer has ``Cache-Control: no-store``.
The stream's refusals (401, 404, a malformed ``Last-Event-ID``, and the 204 of a delivered
stream) are all decided before it starts.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ...engine.broker import Broker
from ...engine.consumers import Consumer
from ...errors import UnknownJobError, UnknownJobKindError
from ...jobs.kinds import kind_for
from ...jobs.model import Job
from ...jobs.service import JobService
from ..access import Caller
from ..errors import NO_STORE, InvalidRequest, NotFound, documented
from ..job_events import JobEventSource, JobFeeds
from ..sse import StreamGauge, StreamLimits, event_stream

__all__ = ["JobIn", "Operator", "SeenJob", "add_routes", "operator", "seen_job", "visible"]

ERRORS = documented(400, 404, 409, 413, 429, 503)


class JobIn(BaseModel):
    """``POST /v1/jobs``: the kind and its params (JSON values; never a secret)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(max_length=32)
    params: dict[str, Any] = Field(default_factory=dict)


def _spans(broker: Broker, kind: str, params: Any) -> list[str]:
    try:
        return kind_for(kind).providers(params, broker.settings)
    except UnknownJobKindError:
        return []


def visible(broker: Broker, caller: Consumer, job: Job) -> bool:
    """Whether ``caller`` may see ``job``: a token rule of its allows every provider the job
    spans (the ``jobs`` word is checked before)."""
    return all(caller.uses(p) for p in _spans(broker, job.kind, job.params))


def _links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "stream": f"/v1/jobs/{job_id}/stream"}


def _accepted(service: JobService, job: Job, cached: bool) -> JSONResponse:
    body: dict[str, Any] = {"job_id": job.job_id, "status": job.status.value, "cached": cached}
    body.update(_extra(service, job))
    return JSONResponse({**body, "links": _links(job.job_id)}, status_code=202, headers=NO_STORE)


def _extra(service: JobService, job: Job) -> dict[str, Any]:
    """``authorize_url`` for an ``authorize`` job waiting for the person (else nothing)."""
    if job.kind != "authorize" or job.phase != "waiting_for_user":
        return {}
    row = service.store.job(job.job_id)
    url = None if row is None else service.authorizations.authorize_url(row)
    return {} if url is None else {"authorize_url": url}


def _document(service: JobService, job: Job) -> dict[str, Any]:
    return {**job.to_dict(), **_extra(service, job)}


def operator(caller: Caller) -> Consumer:
    """The dependency behind :data:`Operator`: the caller, if its allow list has ``jobs``.

    Raises:
        HTTPException: 404, rendered as the app's "no such route" answer, byte for byte.
    """
    if not caller.may_run_jobs():
        raise HTTPException(404)
    return caller


#: A route parameter of this type is a consumer with the ``jobs`` permission.
Operator = Annotated[Consumer, Depends(operator)]


async def seen_job(request: Request, job_id: str, caller: Operator) -> Job:
    """The dependency behind :data:`SeenJob`: the job, if it exists and ``caller`` may see it.

    Raises:
        UnknownJobError: Unknown, or invisible to the caller (indistinguishable).
    """
    service: JobService = request.app.state.jobs
    job = await asyncio.to_thread(service.get, job_id)
    if job is None or not visible(service.broker, caller, job):
        raise UnknownJobError("no such job")
    return job


#: A route parameter of this type is the job of the path's ``job_id``, visible to the caller.
SeenJob = Annotated[Job, Depends(seen_job)]


def add_routes(
    app: FastAPI, broker: Broker, service: JobService, gauge: StreamGauge | None = None
) -> None:
    """Add the ``/v1/jobs`` routes to ``app``.

    Args:
        app: The API (its ``state.jobs`` must be ``service``).
        broker: The broker (its settings say which providers a job spans).
        service: The job service the routes call.
        gauge: Counts the open job streams (``tokenbroker_sse_streams``).
    """
    limits = StreamLimits(heartbeat_seconds=service.settings.heartbeat_seconds)
    feeds = app.state.job_feeds = JobFeeds(service, service.settings.poll_seconds)

    @app.post("/v1/jobs", status_code=202, responses=ERRORS)
    async def start_job(body: JobIn, caller: Operator) -> JSONResponse:
        """Start a job, or answer the active job with the same kind and params
        (``cached: true``)."""
        kind = kind_for(body.kind)  # 400 listing the kinds
        named = body.params.get("provider")
        if isinstance(named, str) and not caller.uses(named):
            raise NotFound("no such provider")  # unknown and forbidden alike
        params = kind.validate(body.params, broker.settings)  # 400 naming the field
        if not all(caller.uses(p) for p in kind.providers(params, broker.settings)):
            raise NotFound("no such provider")
        job, cached = await asyncio.to_thread(service.start, body.kind, body.params, caller.name)
        return await asyncio.to_thread(_accepted, service, job, cached)

    @app.get("/v1/jobs", responses=ERRORS)
    async def list_jobs(
        caller: Operator,
        status: Annotated[str | None, Query(max_length=16)] = None,
        kind: Annotated[str | None, Query(max_length=32)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        cursor: Annotated[str | None, Query(max_length=256)] = None,
    ) -> JSONResponse:
        """Jobs newest first, a page at a time (``next_cursor`` is null on the last page).
        Jobs the consumer may not see are left out, so a page may hold fewer than
        ``limit``."""
        try:
            jobs, after = await asyncio.to_thread(
                service.list, status=status, kind=kind, limit=limit, cursor=cursor
            )
        except ValueError:
            raise InvalidRequest("invalid request: status or cursor") from None
        shown = [
            await asyncio.to_thread(_document, service, j)
            for j in jobs
            if visible(broker, caller, j)
        ]
        return JSONResponse({"jobs": shown, "next_cursor": after}, headers=NO_STORE)

    @app.get("/v1/jobs/{job_id}", responses=ERRORS)
    async def read_job(job: SeenJob) -> JSONResponse:
        """The job: status, phase, progress, items, failed items, error, times; an
        ``authorize`` job waiting for the person also has ``authorize_url``."""
        document = await asyncio.to_thread(_document, service, job)
        return JSONResponse(document, headers=NO_STORE)

    @app.get("/v1/jobs/{job_id}/stream", responses=ERRORS)
    async def stream_job(request: Request, job: SeenJob) -> Response:
        """The job's events as Server-Sent Events: ``phase_update``, ``item_failed``,
        ``heartbeat``, then ``completed``, ``error`` or ``canceled``. ``Last-Event-ID``
        resumes after that event; 204 once the client has the final event."""
        source = JobEventSource(feeds, job.job_id)
        return await event_stream(
            request, source, limits=limits, gauge=gauge, heartbeat=source.heartbeat
        )

    @app.post("/v1/jobs/{job_id}/retry", status_code=202, responses=ERRORS)
    async def retry_job(job: SeenJob, caller: Operator) -> JSONResponse:
        """A new job for only the failed retryable items (409 ``job_not_retryable`` if
        none)."""
        retried, cached = await asyncio.to_thread(service.retry, job.job_id, caller.name)
        return await asyncio.to_thread(_accepted, service, retried, cached)

    @app.post("/v1/jobs/{job_id}/cancel", responses=ERRORS)
    async def cancel_job(job: SeenJob) -> JSONResponse:
        """Ask the job to stop: ``canceling`` until its work has stopped, then ``canceled``
        (a queued job is canceled at once; a finished one is left as it is)."""
        canceled = await asyncio.to_thread(service.cancel, job.job_id)
        return JSONResponse(canceled.to_dict(), headers=NO_STORE)
