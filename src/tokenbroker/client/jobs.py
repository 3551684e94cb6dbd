"""The jobs half of :class:`~tokenbroker.BrokerClient`: start, read, list, cancel, retry and
follow a remote broker's jobs (``/v1/jobs``, DESIGN §3.3).

Jobs are answered as the API renders them (``dict`` of JSON values: ``job_id``, ``status``,
``phase``, ``progress``, ``items``, ``failed``, ``error``, times in UTC ISO 8601);
:meth:`JobsAPI.stream` yields typed events (:mod:`tokenbroker.jobs.events` records) and
resumes with ``Last-Event-ID`` after a dropped connection (:func:`~.sse.read_events`), so
no event is lost or repeated; it ends after the job's final event, or at once when the
server answers ``204`` (the client already has it).

Errors: a job error answer raises the class its ``error.code`` names in the one table
(:mod:`tokenbroker.edge.statuses`): :class:`~tokenbroker.errors.UnknownJobKindError`,
:class:`~tokenbroker.errors.InvalidJobParamsError`, :class:`~tokenbroker.errors.UnknownJobError`,
:class:`~tokenbroker.errors.JobNotRetryableError`, :class:`~tokenbroker.errors.JobLimitError`
(with ``retry_after``); any other answer maps as a token read's does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import httpx

from ..edge.statuses import status_for_code
from ..errors import (
    ClientAuthenticationError,
    InvalidJobParamsError,
    JobLimitError,
    JobRequestError,
    ProviderUnavailableError,
    TokenBrokerError,
    UnknownJobError,
)
from ..jobs.events import JobEvent, event_from
from .sse import read_events

if TYPE_CHECKING:
    from ..core.secret import Secret

__all__ = ["JobsAPI"]

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


class JobsAPI:
    """Job methods of a client that has ``_http`` (an ``httpx.Client`` on the broker's base
    URL) and ``_api_key`` (a :class:`~tokenbroker.core.secret.Secret`)."""

    _http: httpx.Client
    _api_key: Secret

    def start_job(self, kind: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Start a job (or get the active one with the same kind and params).

        Returns:
            ``{job_id, status, cached, links: {self, stream}}``; an ``authorize`` job's
            also has ``authorize_url``, the URL to open.

        Raises:
            UnknownJobKindError, InvalidJobParamsError, JobLimitError: As the broker says.
            UnknownProviderError: A provider this key may not use (or an unknown one).
        """
        return self._call("POST", "/v1/jobs", json={"kind": kind, "params": dict(params or {})})

    def job(self, job_id: str) -> dict[str, Any]:
        """The job.

        Raises:
            UnknownJobError: No such job (or one this key may not see).
        """
        return self._call("GET", f"/v1/jobs/{_segment(job_id)}")

    def jobs(
        self,
        status: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """Jobs newest first: ``{jobs: [...], next_cursor}`` (pass ``next_cursor`` back as
        ``cursor`` for the next page)."""
        query = {
            name: str(value)
            for name, value in (("status", status), ("kind", kind), ("limit", limit))
            if value is not None
        }
        if cursor is not None:
            query["cursor"] = cursor
        return self._call("GET", "/v1/jobs", params=query)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop; the job as it is after the request (``canceling`` or
        ``canceled``)."""
        return self._call("POST", f"/v1/jobs/{_segment(job_id)}/cancel")

    def retry_job(self, job_id: str) -> dict[str, Any]:
        """A new job for the failed retryable items of a ``partial``/``failed`` job.

        Raises:
            JobNotRetryableError: Nothing to retry.
        """
        return self._call("POST", f"/v1/jobs/{_segment(job_id)}/retry")

    def stream(self, job_id: str, last_event_id: int = 0) -> Iterator[JobEvent]:
        """Follow a job's events (heartbeats included) until its final event.

        Args:
            job_id: The job.
            last_event_id: Resume after this event (0: from the first).

        Yields:
            Typed events; reconnects after a dropped connection with ``Last-Event-ID``.

        Raises:
            UnknownJobError: No such job (or one this key may not see).
            ClientAuthenticationError: The key was refused.
            ProviderUnavailableError: The broker could not be reached (after retries).
        """
        url = f"/v1/jobs/{_segment(job_id)}/stream"
        headers = {"Authorization": f"Bearer {self._api_key.reveal()}"}
        try:
            for raw in read_events(
                self._http, url, headers=headers, last_event_id=str(last_event_id or "")
            ):
                try:
                    data = json.loads(raw.data)
                    event = event_from(raw.event, int(raw.id or 0), data)
                except (ValueError, TypeError):
                    raise ProviderUnavailableError(
                        "jobs: a malformed event from the broker"
                    ) from None
                if event is not None:
                    yield event
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            if status == 404:
                raise UnknownJobError("no such job") from None
            if status in (401, 403):
                raise ClientAuthenticationError("the broker rejected the API key") from None
            raise ProviderUnavailableError(f"jobs: the broker answered HTTP {status}") from None
        except httpx.TransportError as exc:
            raise ProviderUnavailableError(
                f"jobs: the broker could not be reached ({type(exc).__name__})"
            ) from None

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._api_key.reveal()}"}
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise ProviderUnavailableError(
                f"jobs: the broker could not be reached ({type(exc).__name__})"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code in (200, 202) and isinstance(body, dict):
            return body
        raise _job_error(response, body)


def _segment(job_id: str) -> str:
    """``job_id`` checked as one URL path segment (so it cannot reach another route).

    Raises:
        UnknownJobError: Not a job id's shape (no such job can exist).
    """
    if not _JOB_ID.match(job_id):
        raise UnknownJobError("no such job")
    return job_id


def _job_error(response: httpx.Response, body: Any) -> TokenBrokerError:
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    message = message if isinstance(message, str) else f"HTTP {response.status_code}"
    row = status_for_code(code if isinstance(code, str) else None)
    if row is None or row.status != response.status_code:
        if response.status_code in (401, 403):
            return ClientAuthenticationError("jobs: the broker rejected the API key")
        return ProviderUnavailableError(f"jobs: the broker answered HTTP {response.status_code}")
    kind = row.error
    if kind is InvalidJobParamsError:
        where, _, what = message.partition(": ")
        return InvalidJobParamsError(where.removeprefix("params").lstrip("."), what or message)
    if kind is JobLimitError:
        wait = response.headers.get("retry-after", "")
        return JobLimitError(message, float(wait) if wait.isdigit() else 5.0)
    if issubclass(kind, JobRequestError):
        return kind(message)
    return kind(f"jobs: {message}")
