"""``GET /v1/oauth/callback``: where a person's browser lands after the provider's consent
page, for an ``authorize`` job (:mod:`tokenbroker.jobs.authorization`).

No consumer key: the single-use ``state`` is the credential. The answer is a small HTML page
("Connected. You can close this window." or why not) with ``Content-Security-Policy:
default-src 'none'``, ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and
``Cache-Control: no-store``; nothing from the query reaches it unescaped (the messages are
the broker's own, and an error code is echoed only when it is a plain snake-case word).
A repeated parameter is refused (RFC 6749 §3.1) like a missing or spent state: 400.
"""

from __future__ import annotations

import asyncio
import html

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from ...jobs.authorization import CallbackOutcome
from ...jobs.service import JobService
from ..access import STATE_PATHS

__all__ = ["CALLBACK_PATH", "add_routes", "page"]

#: Where the provider sends the person back (register ``https://HOST`` + this).
CALLBACK_PATH = "/v1/oauth/callback"
assert CALLBACK_PATH in STATE_PATHS

#: The headers of every callback page.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tokenbroker: {title}</title>
<meta name="viewport" content="width=device-width">
</head><body><h1>{title}</h1><p>{message}</p>{job}</body></html>
"""


def page(outcome: CallbackOutcome) -> HTMLResponse:
    """The callback page of ``outcome``, every value escaped, with :data:`PAGE_HEADERS`."""
    title = "Connected" if outcome.ok else "Authorisation failed"
    job = (
        f"<p>Job <code>{html.escape(outcome.job_id)}</code></p>"
        if outcome.job_id is not None
        else ""
    )
    body = _PAGE.format(title=title, message=html.escape(outcome.message), job=job)
    return HTMLResponse(body, status_code=outcome.status, headers=PAGE_HEADERS)


def add_routes(app: FastAPI, service: JobService) -> None:
    """Add the callback route to ``app``.

    Args:
        app: The API.
        service: The job service whose store holds the authorize jobs.
    """

    # Not in the OpenAPI document: a person's browser calls it, never a consumer, and every
    # refusal is a 400 page (a spent or unknown state) that no schema makes "valid".
    @app.get(CALLBACK_PATH, response_class=HTMLResponse, include_in_schema=False)
    async def oauth_callback(request: Request) -> HTMLResponse:
        """The authorization response of an ``authorize`` job (``code``, ``state``, ``iss``
        or ``error``); an HTML page for the person's browser."""
        pairs = request.query_params.multi_items()
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            refused = CallbackOutcome(False, "A parameter is repeated.", 400)
            return page(refused)
        query = dict(pairs)
        outcome = await asyncio.to_thread(service.authorizations.complete, query)
        return page(outcome)
