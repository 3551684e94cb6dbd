"""The status page in a real browser: Debian's chromium, headless, driven by Playwright, against
a real serve: log in, press Refresh and watch the row and the progress bar reach done without
a reload, stop the authorization server and watch the provider turn stale/failed live.

Skipped (naming the missing chromium) only when /usr/bin/chromium is absent outside CI; under
CI (``CI`` set) or ``make test`` as root (``TOKENBROKER_REQUIRE_BROWSER``) it must run.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console_support import PASSWORD, USER, Keys, kill_rt, make_auth_server, serving

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOT = Path(__file__).parent.parent / "docs" / "status-page.png"


def _required() -> bool:
    if os.environ.get("CI"):
        return True
    return bool(os.environ.get("TOKENBROKER_REQUIRE_BROWSER")) and os.geteuid() == 0


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Debian chromium under Playwright (never a downloaded browser)."""
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} (Debian's chromium) is not installed; `make test-deps` installs it"
        if _required():
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        # Playwright gives each launch a fresh temporary profile (--user-data-dir).
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _loopback_only(route: Any) -> None:
    """Let the page reach 127.0.0.1 only (nothing on the page should go elsewhere)."""
    host = urllib.parse.urlsplit(route.request.url).hostname
    if host == "127.0.0.1":
        route.continue_()
    else:
        route.abort()


def _watched_page(browser: Any) -> tuple[Any, Any, list[str], list[str]]:
    """A new loopback-only context and page, with the URLs of its page loads and the text of
    its console errors recorded in the two lists returned beside them."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(20_000)
    context.route("**/*", _loopback_only)
    page = context.new_page()
    loads: list[str] = []
    page.on("load", lambda p: loads.append(p.url))
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    return context, page, loads, problems


def test_status_page_is_live_in_a_real_browser(browser: Any, tmp_path: Path) -> None:
    """Sign in, see the providers, press Refresh on svc: its job's row and progress bar reach
    done and the provider's last refresh moves without a page load; then the authorization
    server stops and svc turns stale or failed on the open page; a screenshot is saved."""
    server = make_auth_server(expires_in=4)  # background refreshes every ~3 s
    keys = Keys()
    try:
        with serving(tmp_path, server, keys) as running:
            context, page, loads, problems = _watched_page(browser)

            page.goto(running.url + "/ui")
            assert page.url.endswith("/ui/login")
            page.fill("#key", keys.admin)
            page.click("button[type=submit]")
            page.wait_for_url(running.url + "/ui")
            page.locator("#live.on").wait_for()
            svc = page.locator('tr[data-item="provider:svc"]')
            assert svc.locator("td.name").inner_text() == "svc"
            assert page.locator('tr[data-item="pool:/db/"] td.idle').inner_text() == "2"
            rt = page.locator('tr[data-item="provider:rt"]')
            assert rt.locator("button.authorize").count() == 1
            loaded = len(loads)

            before = svc.get_attribute("data-last-refresh")
            svc.locator("button.refresh").click()
            job = page.locator('tr[data-item^="job:"]').first
            job.locator("span.status.done").wait_for()
            page.wait_for_function(
                "() => document.querySelector('tr[data-item^=\"job:\"] progress').value === 100"
            )
            assert job.locator(".pct").inner_text() == "100%"
            page.wait_for_function(
                "(before) => document.querySelector('tr[data-item=\"provider:svc\"]')"
                ".dataset.lastRefresh !== before",
                arg=before,
            )
            assert svc.locator("span.state").inner_text() == "valid"
            assert "refresh job" in svc.locator(".note").inner_text()
            page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)
            if os.environ.get("TOKENBROKER_UPDATE_SCREENSHOT"):
                shutil.copyfile(tmp_path / "status-page.png", DOCS_SCREENSHOT)

            server.stop()
            page.wait_for_function(
                "() => ['stale', 'failed'].includes(document.querySelector("
                "'tr[data-item=\"provider:svc\"]').dataset.state)"
            )
            assert svc.locator("td.error").inner_text() != "-"
            page.screenshot(path=str(tmp_path / "status-page-outage.png"), full_page=True)
            assert len(loads) == loaded  # all of it live, no page load since sign-in
            html = page.content()
            assert problems == []
            context.close()
    finally:
        server.stop()
    assert (tmp_path / "status-page.png").stat().st_size > 10_000
    assert keys.admin not in html and keys.admin not in running.stderr
    for token in server.issued_access_tokens:
        assert token not in html


def test_reauthorise_in_a_real_browser(browser: Any, tmp_path: Path) -> None:
    """rt is reauthorization_required; sign in, click Re-authorise: the page opens the
    authorize job's URL in a new tab, where the person signs in and consents on the
    authorization server's own pages (same browser) and lands on the broker's "Connected"
    page; meanwhile the status page shows the authorize job (phase waiting_for_user, then
    done) and turns rt valid without a reload; a screenshot is saved."""
    server = make_auth_server()
    keys = Keys()
    try:
        with serving(tmp_path, server, keys) as running:
            kill_rt(server, running.url, keys.admin)
            context, page, loads, problems = _watched_page(browser)

            page.goto(running.url + "/ui/login")
            page.fill("#key", keys.admin)
            page.click("button[type=submit]")
            page.wait_for_url(running.url + "/ui")
            page.locator("#live.on").wait_for()
            rt = page.locator('tr[data-item="provider:rt"]')
            page.wait_for_function(
                "() => document.querySelector('tr[data-item=\"provider:rt\"]')"
                ".dataset.state === 'reauthorization_required'"
            )
            loaded = len(loads)

            with context.expect_page() as opened:
                rt.locator("button.authorize").click()
            popup = opened.value
            popup.wait_for_url(server.url + "/**")
            job = page.locator('tr[data-item^="job:"]').first
            page.wait_for_function(
                "() => { const r = document.querySelector('tr[data-item^=\"job:\"]');"
                " return r && r.querySelector('td.phase').textContent === 'waiting_for_user'"
                " && r.dataset.status === 'running'; }"
            )
            assert job.locator("td:nth-child(2)").inner_text() == "authorize"
            assert "authorize job" in rt.locator(".note").inner_text()

            popup.fill("input[name=username]", USER)
            popup.fill("input[name=password]", PASSWORD)
            popup.click("button[type=submit]")
            popup.locator("button[value=approve]").click()
            popup.wait_for_url(server.callback + "?**")
            assert popup.locator("h1").inner_text() == "Connected"
            popup.screenshot(path=str(tmp_path / "connected.png"))

            page.wait_for_function(
                "() => document.querySelector('tr[data-item=\"provider:rt\"]')"
                ".dataset.state === 'valid'"
            )
            job.locator("span.status.done").wait_for()
            assert rt.locator("span.state").inner_text() == "valid"
            page.screenshot(path=str(tmp_path / "status-page-reauthorised.png"), full_page=True)
            assert len(loads) == loaded  # the status page never reloaded
            assert problems == []
            html = page.content() + popup.content()
            context.close()
    finally:
        server.stop()
    assert (tmp_path / "status-page-reauthorised.png").stat().st_size > 10_000
    assert keys.admin not in html and keys.admin not in running.stderr
    for token in [*server.issued_access_tokens, *server.presented_refresh_tokens]:
        assert token not in html and token not in running.stderr
