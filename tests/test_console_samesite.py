"""The status page's session cookie does not work cross-site (issue 18 §4, SameSite), in a real
browser: Debian's chromium under Playwright, a real serve, and a second site on the same
machine (``http://evil.test:PORT``, mapped to 127.0.0.1 with ``--host-resolver-rules``: another
host, so another site for SameSite) whose pages, opened in the signed-in browser, auto-submit
the Refresh form with a CSRF token copied from the real page, fetch ``/v1/events`` and ``/ui``
with ``credentials: 'include'``, and navigate the top level to ``/ui`` and ``/v1/events``.

The broker must see every one of those requests without ``tb_session`` (it answers 403, 401,
or the login redirect) and start no job, while the same form posted from the real page starts
one. With ``SameSite=None`` the POST would start a job; with ``Lax`` the top-level GET
navigations would carry the cookie: both fail this test.

No httpx replay test: a session is bound to its consumer's key (the tag), not to a client,
so a copied cookie value works from any client until it expires (see the README)."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from console_support import Keys, make_auth_server, serving
from support import free_port, wait_for
from test_console_browser import ARGS, CHROMIUM, _required

EVIL = "evil.test"


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Debian chromium resolving ``evil.test`` to 127.0.0.1 (and nothing else)."""
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} (Debian's chromium) is not installed; `make test-deps` installs it"
        if _required():
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    rules = f"--host-resolver-rules=MAP {EVIL} 127.0.0.1, EXCLUDE 127.0.0.1"
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, rules])
        try:
            yield launched
        finally:
            launched.close()


@contextlib.contextmanager
def other_site(pages: dict[str, str]) -> Iterator[str]:
    """A tiny HTTP server on 127.0.0.1 serving ``pages`` (path -> HTML); its base URL as
    ``http://evil.test:PORT``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            body = pages.get(self.path)
            if body is None:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{EVIL}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _form(action: str, csrf: str, auto: bool) -> str:
    script = "<script>document.forms[0].submit()</script>" if auto else ""
    return (
        f'<!doctype html><form method="post" action="{action}">'
        '<input type="hidden" name="kind" value="refresh">'
        '<input type="hidden" name="provider" value="svc">'
        f'<input type="hidden" name="csrf" value="{csrf}"></form>{script}'
    )


def _jobs(url: str, key: str) -> list[dict[str, Any]]:
    answer = httpx.get(url + "/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    jobs: list[dict[str, Any]] = answer.json()["jobs"]
    return jobs


def test_session_cookie_is_not_sent_cross_site(browser: Any, tmp_path: Path) -> None:
    """Signed in at 127.0.0.1, the same browser opens evil.test pages: the auto-submitted
    Refresh form (with the real CSRF token) gets 403 "Sign in first." and starts nothing;
    fetch() with credentials to /v1/events and /ui and top-level navigations to /ui and
    /v1/events reach the broker without the cookie (401, the login redirect); the same form
    posted from the real page starts a job."""
    server = make_auth_server()
    keys = Keys()
    try:
        with serving(tmp_path, server, keys) as running:
            context = browser.new_context()
            context.set_default_timeout(20_000)
            page = context.new_page()
            seen: list[Any] = []  # the broker's answers, with the requests the browser sent
            page.on("response", lambda r: seen.append(r) if r.url.startswith(running.url) else 0)

            page.goto(running.url + "/ui/login")
            page.fill("#key", keys.admin)
            page.click("button[type=submit]")
            page.wait_for_url(running.url + "/ui")
            cookies = {c["name"]: c for c in context.cookies(running.url)}
            assert cookies["tb_session"]["sameSite"] == "Strict"
            assert cookies["tb_session"]["httpOnly"] is True
            csrf = page.locator('input[name="csrf"]').first.get_attribute("value")
            assert csrf
            assert _jobs(running.url, keys.admin) == []

            fetches = (
                "<!doctype html><script>"
                f"for (const p of ['/v1/events', '/ui']) fetch('{running.url}' + p,"
                " {credentials: 'include', mode: 'no-cors'}).then(() => {"
                " document.title += p; }, () => { document.title += p; });"
                "</script>"
            )
            pages = {
                "/post.html": _form(running.url + "/ui/jobs", csrf, auto=True),
                "/fetch.html": fetches,
                "/nav-ui.html": f"<script>location.href = '{running.url}/ui'</script>",
                "/nav-events.html": (f"<script>location.href = '{running.url}/v1/events'</script>"),
            }
            broker = running.url + "/**"
            with other_site(pages) as evil:
                # 1. The Refresh form, auto-submitted from the other site.
                seen.clear()
                page.goto(evil + "/post.html")
                page.wait_for_url(broker, wait_until="commit")
                page.wait_for_load_state()
                assert page.url == running.url + "/ui/jobs"  # not /ui?notice=started
                assert "Sign in first." in page.content()
                posted = [r for r in seen if r.url == running.url + "/ui/jobs"]
                assert [r.status for r in posted] == [403]
                assert "tb_session" not in posted[0].request.all_headers().get("cookie", "")

                # 2. fetch() with credentials: the broker answers as to a stranger.
                seen.clear()
                page.goto(evil + "/fetch.html")
                page.wait_for_function("() => document.title.length === '/v1/events/ui'.length")
                wait_for(lambda: len(seen) >= 3, "the broker's answers to the fetches")
                statuses = {r.url.removeprefix(running.url): r.status for r in seen}
                # /ui redirects to the login form (which the fetch follows).
                assert statuses == {"/v1/events": 401, "/ui": 303, "/ui/login": 200}, statuses
                for response in seen:
                    assert "tb_session" not in response.request.all_headers().get("cookie", "")

                # 3. Top-level GET navigations (what SameSite=Lax would let through).
                seen.clear()
                page.goto(evil + "/nav-ui.html")
                page.wait_for_url(broker, wait_until="commit")
                assert page.url == running.url + "/ui/login"  # not the status page
                first = next(r for r in seen if r.url == running.url + "/ui")
                assert first.status == 303
                assert "tb_session" not in first.request.all_headers().get("cookie", "")

                seen.clear()
                page.goto(evil + "/nav-events.html")
                page.wait_for_url(broker, wait_until="commit")  # a stream never loads
                events = next(r for r in seen if r.url == running.url + "/v1/events")
                assert events.status == 401
                assert "tb_session" not in events.request.all_headers().get("cookie", "")

            assert _jobs(running.url, keys.admin) == []  # nothing was started

            # The same form from the real page (same site): the cookie goes, the job starts.
            page.goto(running.url + "/ui")
            page.evaluate(
                "(html) => { const d = document.createElement('div'); d.innerHTML = html;"
                " document.body.append(d); d.querySelector('form').submit(); }",
                _form("/ui/jobs", csrf, auto=False),
            )
            page.wait_for_url(running.url + "/ui?notice=started")
            started = _jobs(running.url, keys.admin)
            assert [(j["kind"], j["params"]) for j in started] == [("refresh", {"provider": "svc"})]
            context.close()
    finally:
        server.stop()
