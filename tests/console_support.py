"""The status page's test stage: a real `tokenbroker serve` on an encrypted SQLite store in
front of a real authorization server, with an admin consumer, a non-admin one, and a reader of
``/v1/events`` (shared by tests/test_console.py and tests/test_console_browser.py)."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from support import CLIENT_ID, CLIENT_SECRET, free_port, login, serve_process, wait_for
from tokenbroker.client.sse import EventParser
from tokenbroker.core.crypto import generate_key
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.testing import AuthorizationServer

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Keys:
    """The stage's consumer keys: ``admin`` (svc, rt, jobs, admin) and ``plain`` (svc, jobs)."""

    def __init__(self) -> None:
        self.admin = new_key()
        self.plain = new_key()


#: The scopes ``rt`` asks for when re-authorised (a refresh token needs offline_access).
RT_SCOPES = ["openid", "offline_access", "read"]
USER, PASSWORD = "alice", "alice-pw"


class StageServer(AuthorizationServer):
    """The bundled authorization server, knowing the port the stage's serve will listen on
    (``rt-client`` registers that serve's ``/v1/oauth/callback`` as its redirect URI)."""

    serve_port: int
    proxy_port: int
    rt_seed: str

    @property
    def callback(self) -> str:
        """The broker's callback URL, exactly as registered."""
        return f"http://127.0.0.1:{self.serve_port}/v1/oauth/callback"


def make_auth_server(expires_in: int = 3600) -> StageServer:
    """A started authorization server with the client-credentials and refresh-token clients
    (strict rotation: a refresh token presented twice revokes its family)."""
    server = StageServer(expires_in=expires_in)
    server.serve_port, server.proxy_port = free_port(), free_port()
    server.add_client(CLIENT_ID, CLIENT_SECRET, scopes=["read", "write"])
    server.add_client(
        "rt-client", None, auth_method="none", scopes=RT_SCOPES, redirect_uris=[server.callback]
    )
    server.add_account(USER, PASSWORD)
    server.add_account("bob", "bob-pw")
    return server.start()


def console_config(server: StageServer, tmp_path: Path, keys: Keys) -> dict[str, Any]:
    """A serve config: providers ``svc`` (client credentials), ``rt`` (a seeded refresh
    token and an ``authorization`` block for the Re-authorise button; its seed is in
    ``server.rt_seed``) and ``db`` (a login pool of alice and bob behind the proxy's ``/db/`` route, in the
    same process), consumers ``ops`` (admin) and ``dev`` (no admin), debug logs, fast jobs."""
    seed = server.issue_refresh_token("rt-client", "offline_access read")
    server.rt_seed = seed
    return {
        "store": f"sqlite:///{tmp_path / 'tb.db'}",
        "encryption_keys": [generate_key()],
        "defaults": {"retries": 0, "backoff_seconds": 0.01, "invalidate_cooldown_seconds": 0},
        "providers": {
            "svc": {
                "grant": "client_credentials",
                "token_url": server.token_url,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "scopes": ["read"],
                "required": True,
            },
            "rt": {
                "grant": "refresh_token",
                "token_url": server.token_url,
                "client_id": "rt-client",
                "refresh_token": seed,
                "authorization": {
                    "issuer": server.issuer,
                    "redirect_uri": server.callback,
                    "scopes": RT_SCOPES,
                    "params": {"prompt": "consent"},
                },
            },
            "db": login(server),
        },
        "proxy": {
            "listen": f"127.0.0.1:{server.proxy_port}",
            "routes": [{"prefix": "/db/", "upstream": "http://127.0.0.1:9", "provider": "db"}],
        },
        "consumers": {
            "ops": {
                "api_key_sha256": hash_key(keys.admin),
                "allow": ["svc", "rt", "jobs", "admin"],
            },
            "dev": {"api_key_sha256": hash_key(keys.plain), "allow": ["svc", "jobs"]},
        },
        "server": {"listen": f"127.0.0.1:{server.serve_port}"},
        "telemetry": {"log_level": "debug"},
        "jobs": {"heartbeat_seconds": 0.2, "lease_seconds": 1.5, "poll_seconds": 0.05},
    }


@contextlib.contextmanager
def serving(tmp_path: Path, server: StageServer, keys: Keys) -> Iterator[Any]:
    """A running serve for :func:`console_config` (its stderr is read once it stops)."""
    with serve_process(tmp_path / "tb.yaml", console_config(server, tmp_path, keys)) as running:
        yield running


def kill_rt(server: StageServer, url: str, key: str) -> None:
    """Make ``rt`` dead: spend its seed outside the broker, so the broker's next refresh is
    a reuse (the server revokes the family), and ask serve for its token once, so it learns
    it: ``rt`` is then ``reauthorization_required``."""
    spent = httpx.post(
        server.token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": server.rt_seed,
            "client_id": "rt-client",
        },
        timeout=10,
    )
    assert spent.status_code == 200, spent.text
    answer = httpx.get(
        url + "/v1/tokens/rt", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert answer.status_code >= 400 and "reauthorization_required" in answer.text, answer.text


def log_in(url: str, key: str) -> tuple[httpx.Client, httpx.Response]:
    """A cookie-keeping client that opened the login form and posted ``key`` (no redirects
    followed); the client and the POST's answer."""
    client = httpx.Client(base_url=url, timeout=15)
    form = client.get("/ui/login")
    token = CSRF.search(form.text)
    assert form.status_code == 200 and token, form.text
    answer = client.post("/ui/login", data={"key": key, "csrf": token.group(1)})
    return client, answer


def page_csrf(client: httpx.Client) -> str:
    """The CSRF token of the signed-in page."""
    page = client.get("/ui")
    assert page.status_code == 200, page.text
    found = CSRF.search(page.text)
    assert found
    return found.group(1)


class EventReader:
    """Reads ``/v1/events`` in a thread (with the client's cookies or ``headers``) and keeps
    every event; :meth:`wait` waits for one matching a condition."""

    def __init__(self, url: str, cookies: httpx.Cookies | None = None, **headers: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[str] = []
        self.status: int | None = None
        self._client = httpx.Client(base_url=url, cookies=cookies, timeout=30)
        self._stop = threading.Event()
        self._headers = headers
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_for(lambda: self.status is not None, "the event stream to answer")

    def _read(self) -> None:
        parser = EventParser()
        with self._client.stream("GET", "/v1/events", headers=self._headers) as response:
            self.status = response.status_code
            if response.status_code != 200:
                return
            for chunk in response.iter_text():
                self.raw.append(chunk)
                for event in parser.feed(chunk):
                    if event.event != "heartbeat":
                        self.events.append((event.event or "", json.loads(event.data)))
                if self._stop.is_set():
                    return

    def wait(
        self, condition: Callable[[str, dict[str, Any]], bool], what: str, timeout: float = 20
    ) -> dict[str, Any]:
        """The first event (seen so far or later) matching ``condition``."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            for name, data in list(self.events):
                if condition(name, data):
                    found.append(data)
                    return True
            return False

        wait_for(seen, what, timeout)
        return found[0]

    def close(self) -> None:
        """Stop reading (the next chunk, at most a heartbeat away, ends the thread)."""
        self._stop.set()
        self._thread.join(10)
        self._client.close()
