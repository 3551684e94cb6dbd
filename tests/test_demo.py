"""``tokenbroker dev`` as a process: no full token on screen, SIGTERM stops it like Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from support import Lines


def test_dev_shows_no_token_and_sigterm_stops_it_and_removes_its_folder() -> None:
    """The demo's output holds no access token it hands out; SIGTERM prints 'stopped', exits 0
    and removes the temporary folder, as Ctrl-C does."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenbroker.cli", "dev", "--port", "0", "--lifetime", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = Lines(proc.stdout)
    seen = out.seen
    try:
        out.until("watching background refreshes", 60)
        key = next(line.split("=", 1)[1] for line in seen if "export TB_KEY=" in line)
        api_line = next(line for line in seen if "broker API" in line)
        api = api_line.split()[2]
        store = Path(api_line.split("store ")[1].split(",")[0])
        assert store.parent.is_dir()
        shown = httpx.get(
            f"{api}/v1/tokens/demo-api", headers={"Authorization": f"Bearer {key}"}
        ).json()["access_token"]
        assert len(shown) >= 16
        assert not [line for line in seen if shown in line]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in out.rest()
        assert not store.parent.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_dev_prints_the_status_page_and_it_follows_background_refreshes() -> None:
    """The demo prints the status page URL; its consumer key signs in there (it has admin),
    and /v1/events shows a provider's last refresh moving with the demo's background
    refreshes, without the key or a token in the stream."""
    from console_support import EventReader, log_in

    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenbroker.cli", "dev", "--port", "0", "--lifetime", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = Lines(proc.stdout)
    try:
        page_line = out.until("status page", 60)
        url = page_line.split()[2]
        assert url.endswith("/ui")
        out.until("watching background refreshes", 60)
        key = next(line.split("=", 1)[1] for line in out.seen if "export TB_KEY=" in line)
        client, answer = log_in(url.removesuffix("/ui"), key)
        assert answer.status_code == 303
        assert 'data-item="pool:/"' in client.get("/ui").text
        reader = EventReader(url.removesuffix("/ui"), cookies=client.cookies)
        try:
            first = reader.wait(lambda n, d: d["item"] == "provider:demo-api", "demo-api")
            reader.wait(
                lambda n, d: (
                    d["item"] == "provider:demo-api"
                    and (d["last_refresh"] or 0) > (first["last_refresh"] or 0)
                ),
                "a background refresh of demo-api on the stream",
            )
            assert key not in "".join(reader.raw)
        finally:
            reader.close()
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_dev_prints_an_authorize_url_that_connects_the_refresh_token_provider() -> None:
    """The demo prints the URL of an authorize job of demo-rotating; signing in as alice on the
    bundled server's pages and consenting lands on the broker's callback: "Connected"."""
    from tokenbroker.testing import complete_authorization

    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenbroker.cli", "dev", "--port", "0", "--lifetime", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = Lines(proc.stdout)
    try:
        out.until("watching background refreshes", 60)
        url = next(line.split()[-1] for line in out.seen if "authorize URL" in line)
        assert "code_challenge_method=S256" in url
        assert any("tokenbroker authorize demo-rotating" in line for line in out.seen)
        landing = complete_authorization(url, username="alice", password="alice-password")
        page = httpx.get(landing, timeout=30)
        assert page.status_code == 200 and "Connected" in page.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
