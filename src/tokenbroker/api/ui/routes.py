"""The status page's routes on the API port (issue 18 §2).

=======  ========================  =========================================================
Method   Path                      Answer
=======  ========================  =========================================================
GET      /ui                       the page; no session: 303 to ``/ui/login``
GET      /ui/login                 the login form (sets the pre-login cookie its token binds)
POST     /ui/login                 ``key`` + ``csrf``: a session cookie and 303 to ``/ui``
POST     /ui/logout                clears the session cookie, 303 to ``/ui/login``
POST     /ui/jobs                  ``kind`` (``refresh``/``authorize``) + ``provider``: a job
GET      /ui/jobs/{id}             the job's row and its ``authorize_url`` (if it has one)
POST     /ui/jobs/{id}/cancel      cancel the job
POST     /ui/jobs/{id}/retry       retry its failed items
GET      /ui/static/{name}         ``console.js``, ``console.css``
=======  ========================  =========================================================

Who: a session (:mod:`.session`) of a consumer with the ``admin`` rule, or on ``GET /ui`` an
``Authorization: Bearer`` key with it (which starts a session). Without ``admin``: 403.
Every POST needs the session's CSRF token (``csrf`` field or ``X-CSRF-Token`` header), else
403 and nothing happens. POSTs answer JSON when the request accepts it (the script), else
303 back to ``/ui`` with a fixed notice. Every answer has :data:`PAGE_HEADERS` (strict CSP,
no framing, no referrer, no caching). The key pasted at login is never logged or echoed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import secrets
import urllib.parse
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from ...engine.consumers import hash_key
from ...errors import TokenBrokerError, UnknownJobKindError
from ...jobs.kinds import kind_for
from ...jobs.service import JobService
from ..access import authenticate
from ..errors import RateLimited, Unauthorized, error_code, error_response
from .pages import login_page, message_page, status_page
from .session import COOKIE, CSRF_HEADER, Session, SessionSigner
from .views import StatusView, job_row

__all__ = ["PAGE_HEADERS", "add_routes", "page_session"]

#: Headers of every ``/ui`` answer.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
LOGIN_COOKIE = "tb_login"
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
#: The notices a redirect back to the page may name (a fixed text per code, never echoed).
NOTICES = {
    "started": "Job started.",
    "canceled": "Cancel requested.",
    "retried": "Retry started.",
    "unknown_job_kind": "This server cannot run that job kind yet.",
    "not_retryable": "That job has no failed items to retry.",
    "refused": "The job was refused.",
}
_KINDS = ("refresh", "authorize")


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=PAGE_HEADERS)


def _json(body: Mapping[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(dict(body), status_code=status, headers=PAGE_HEADERS)


def _redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers=PAGE_HEADERS)


def _set_cookie(request: Request, response: Response, name: str, value: str, age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def page_session(request: Request) -> Session | None:
    """The request's verified session (None: absent, forged, expired, or its key lost
    ``admin``)."""
    signer: SessionSigner = request.app.state.sessions
    return signer.verify(request.cookies.get(COOKIE), request.app.state.consumers)


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded body's fields (first value each); an undecodable body is empty."""
    if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
        return {}
    body = (await request.body()).decode("utf-8", "replace")
    with contextlib.suppress(ValueError):
        fields = urllib.parse.parse_qs(body, max_num_fields=8)
        return {k: v[0] for k, v in fields.items()}
    return {}


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _forbidden(request: Request, text: str) -> Response:
    if _wants_json(request):
        return _json({"error": {"code": "forbidden", "message": text}}, 403)
    return _html(message_page("Forbidden", text), 403)


async def _guarded(request: Request) -> tuple[Session | None, dict[str, str], Response | None]:
    """The session and form of a page POST, or the 403 that refuses it (no session, or a
    missing or wrong CSRF token)."""
    session = page_session(request)
    form = await _form(request)
    if session is None:
        return None, form, _forbidden(request, "Sign in first.")
    presented = request.headers.get(CSRF_HEADER) or form.get("csrf")
    if not SessionSigner.check(session.csrf, presented):
        return None, form, _forbidden(request, "The form's CSRF token is missing or wrong.")
    return session, form, None


def _authorize_url(service: JobService, job_id: str) -> str | None:
    """The URL of an ``authorize`` job waiting for the person: the same top-level
    ``authorize_url`` ``GET /v1/jobs/{id}`` shows (opened from the job's sealed record)."""
    row = service.store.job(job_id)
    return None if row is None else service.authorizations.authorize_url(row)


def add_routes(app: FastAPI, view: StatusView) -> None:
    """Add the ``/ui`` routes (``app.state.sessions`` and ``app.state.consumers`` must be set)."""
    _add_page_routes(app, view)
    _add_job_routes(app, view)


def _done(request: Request, notice: str, body: Mapping[str, Any], status: int = 200) -> Response:
    """A POST's answer: JSON for the script, else 303 back to the page with a fixed notice."""
    if _wants_json(request):
        return _json(body, status)
    return _redirect(f"/ui?notice={notice}")


def _add_page_routes(app: FastAPI, view: StatusView) -> None:
    @app.get("/ui", include_in_schema=False)
    async def page(request: Request) -> Response:
        session = page_session(request)
        fresh = None
        header = request.headers.get("authorization", "")
        if session is None and header.lower().startswith("bearer "):
            source = request.client.host if request.client else "unknown"
            key = header[7:].strip()
            try:
                consumer = authenticate(
                    request.app.state.consumers, request.app.state.limits, key, source
                )
            except (Unauthorized, RateLimited) as exc:
                return error_response(exc)
            if not consumer.is_admin():
                return _forbidden(request, "This key does not have the admin permission.")
            signer: SessionSigner = request.app.state.sessions
            fresh = signer.issue(consumer.name, hash_key(key))
            session = signer.verify(fresh, request.app.state.consumers)
        if session is None:
            return _redirect("/ui/login")
        snap = await asyncio.to_thread(view.snapshot)
        notice = NOTICES.get(request.query_params.get("notice", ""))
        response = _html(status_page(snap, session.csrf, session.consumer.name, notice))
        if fresh is not None:
            _set_cookie(request, response, COOKIE, fresh, signer_age(request.app.state.sessions))
        return response

    @app.get("/ui/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        signer: SessionSigner = request.app.state.sessions
        response = _html(login_page(signer.login_token(nonce)))
        _set_cookie(request, response, LOGIN_COOKIE, nonce, 600)
        return response

    @app.post("/ui/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        signer: SessionSigner = request.app.state.sessions
        form = await _form(request)
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not signer.check(signer.login_token(nonce), form.get("csrf")):
            return _forbidden(request, "The login form expired: open it again.")
        key = form.get("key", "").strip()
        source = request.client.host if request.client else "unknown"
        try:
            consumer = authenticate(
                request.app.state.consumers, request.app.state.limits, key or None, source
            )
        except RateLimited as exc:
            return error_response(exc)
        except Unauthorized:
            fresh = secrets.token_urlsafe(16)
            response = _html(login_page(signer.login_token(fresh), "That key is not valid."), 401)
            _set_cookie(request, response, LOGIN_COOKIE, fresh, 600)
            return response
        if not consumer.is_admin():
            return _forbidden(request, "This key does not have the admin permission.")
        redirect = _redirect("/ui")
        _set_cookie(
            request,
            redirect,
            COOKIE,
            signer.issue(consumer.name, hash_key(key)),
            signer_age(signer),
        )
        redirect.delete_cookie(LOGIN_COOKIE, path="/", httponly=True, samesite="strict")
        return redirect

    @app.post("/ui/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        _, _, refused = await _guarded(request)
        if refused is not None:
            return refused
        response = _redirect("/ui/login")
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response


def _add_job_routes(app: FastAPI, view: StatusView) -> None:
    service = view.jobs
    broker = view.broker

    @app.post("/ui/jobs", include_in_schema=False)
    async def start(request: Request) -> Response:
        session, form, refused = await _guarded(request)
        if refused is not None or session is None:
            return refused or _forbidden(request, "Sign in first.")
        kind_name, provider = form.get("kind", ""), form.get("provider", "")
        if kind_name not in _KINDS or provider not in broker.settings.providers:
            return _done(request, "refused", {"error": {"code": "invalid_request"}}, 400)
        params = {"provider": provider}
        try:
            kind = kind_for(kind_name)
            kind.validate(params, broker.settings)
            job, _ = await asyncio.to_thread(
                service.start, kind_name, params, session.consumer.name
            )
        except UnknownJobKindError:
            body = {
                "error": {
                    "code": "unknown_job_kind",
                    "message": f"this server has no {kind_name} job kind",
                }
            }
            return _done(request, "unknown_job_kind", body, 400)
        except TokenBrokerError as exc:
            return _done(request, "refused", {"error": {"code": error_code(exc)}}, 409)
        url = None
        if kind_name == "authorize":
            url = await asyncio.to_thread(_authorize_url, service, job.job_id)
        return _done(request, "started", {"job": job_row(job), "authorize_url": url}, 202)

    @app.get("/ui/jobs/{job_id}", include_in_schema=False)
    async def one_job(request: Request, job_id: str) -> Response:
        if page_session(request) is None:
            return _forbidden(request, "Sign in first.")
        job = await asyncio.to_thread(service.get, job_id)
        if job is None:
            return _json({"error": {"code": "job_not_found"}}, 404)
        url = await asyncio.to_thread(_authorize_url, service, job_id)
        return _json({"job": job_row(job), "authorize_url": url})

    @app.post("/ui/jobs/{job_id}/cancel", include_in_schema=False)
    async def cancel(request: Request, job_id: str) -> Response:
        _, _, refused = await _guarded(request)
        if refused is not None:
            return refused
        try:
            job = await asyncio.to_thread(service.cancel, job_id)
        except TokenBrokerError as exc:
            return _done(request, "refused", {"error": {"code": error_code(exc)}}, 404)
        return _done(request, "canceled", {"job": job_row(job)})

    @app.post("/ui/jobs/{job_id}/retry", include_in_schema=False)
    async def retry(request: Request, job_id: str) -> Response:
        session, _, refused = await _guarded(request)
        if refused is not None or session is None:
            return refused or _forbidden(request, "Sign in first.")
        try:
            job, _ = await asyncio.to_thread(service.retry, job_id, session.consumer.name)
        except TokenBrokerError as exc:
            return _done(request, "not_retryable", {"error": {"code": error_code(exc)}}, 409)
        return _done(request, "retried", {"job": job_row(job)}, 202)

    @app.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        media = STATIC.get(name)
        if media is None:
            return Response(status_code=404, headers=PAGE_HEADERS)
        text = importlib.resources.files(__package__).joinpath("static", name).read_text()
        return Response(text, media_type=media, headers=PAGE_HEADERS)


def signer_age(signer: SessionSigner) -> int:
    """The session cookie's ``Max-Age``."""
    return int(signer.lifetime)
