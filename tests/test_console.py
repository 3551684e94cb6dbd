"""The status page (/ui) and /v1/events against a real serve, without a browser: login, live
updates, the security model, and the canaries (no token, secret or key anywhere)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from console_support import (
    PASSWORD,
    USER,
    EventReader,
    Keys,
    StageServer,
    kill_rt,
    log_in,
    make_auth_server,
    page_csrf,
    serving,
)
from tokenbroker.api.status_feed import StatusFeed
from tokenbroker.api.ui.views import Snapshot
from tokenbroker.core.events import EventBus, TokenAcquired
from tokenbroker.testing import AuthorizationServer, complete_authorization

HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
        "frame-ancestors 'none'"
    ),
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@pytest.fixture
def server() -> Iterator[AuthorizationServer]:
    auth = make_auth_server()
    yield auth
    auth.stop()


def jobs_of(url: str, key: str) -> list[dict[str, Any]]:
    answer = httpx.get(url + "/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    jobs: list[dict[str, Any]] = answer.json()["jobs"]
    return jobs


def secrets_of(server: AuthorizationServer, keys: Keys) -> list[str]:
    """Every token, secret and key that must never show: the consumer keys, the client secret,
    and every access and refresh token the server issued."""
    issued = [*server.issued_access_tokens, *server.presented_refresh_tokens]
    assert issued
    return [keys.admin, keys.plain, "svc-secret", *issued]


def test_login_refresh_and_outage_are_live_and_leak_nothing(
    server: AuthorizationServer, tmp_path: Path
) -> None:
    """Log in with an admin key (a session cookie, never the key), see the providers, press
    Refresh (the job's events reach done and the provider's last refresh moves), stop the
    authorization server and see the provider turn stale/failed on /v1/events; no key,
    secret or token on the page, in the stream or in serve's debug logs; serve stops at once
    with a stream still open."""
    keys = Keys()
    with serving(tmp_path, server, keys) as running:
        client, answer = log_in(running.url, keys.admin)
        assert answer.status_code == 303 and answer.headers["location"] == "/ui"
        cookie = next(c for c in answer.headers.get_list("set-cookie") if "tb_session=" in c)
        assert keys.admin not in cookie
        attributes = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/"} <= attributes
        assert "secure" not in attributes  # plain HTTP; Secure only over TLS
        page = client.get("/ui")
        assert page.status_code == 200
        for name, value in HEADERS.items():
            assert page.headers[name] == value
        assert 'data-item="provider:svc"' in page.text and 'data-item="provider:rt"' in page.text
        assert 'data-item="pool:/db/"' in page.text
        assert "Re-authorise" in page.text and "<script" in page.text
        assert "<script>" not in page.text and "style=" not in page.text  # nothing inline
        before = client.get("/ui/static/console.js")
        assert before.status_code == 200 and "EventSource" in before.text
        assert before.headers["content-security-policy"] == HEADERS["content-security-policy"]

        reader = EventReader(running.url, cookies=client.cookies)
        try:
            assert reader.status == 200
            first = reader.wait(lambda n, d: d["item"] == "provider:svc", "svc's state")
            pool = reader.wait(lambda n, d: d["item"] == "pool:/db/", "the proxy's pool")
            assert pool["provider"] == "db" and pool["leased"] + pool["idle"] == 2
            csrf = page_csrf(client)
            started = client.post(
                "/ui/jobs",
                data={"kind": "refresh", "provider": "svc", "csrf": csrf},
                headers={"Accept": "application/json"},
            )
            assert started.status_code == 202, started.text
            job_id = started.json()["job"]["job_id"]
            reader.wait(
                lambda n, d: (
                    n == "job"
                    and d["job_id"] == job_id
                    and d["status"] == "done"
                    and d["progress"] == 100
                ),
                "the refresh job to reach done",
            )
            reader.wait(
                lambda n, d: (
                    d["item"] == "provider:svc"
                    and (d["last_refresh"] or 0) > (first["last_refresh"] or 0)
                ),
                "svc's last refresh to move",
            )
            server.stop()
            client.post(
                "/ui/jobs",
                data={"kind": "refresh", "provider": "svc", "csrf": csrf},
                headers={"Accept": "application/json"},
            )
            down = reader.wait(
                lambda n, d: d["item"] == "provider:svc" and d["state"] in ("stale", "failed"),
                "svc to turn stale or failed",
            )
            assert down["last_error"] and down["last_code"]
            text = "".join(reader.raw) + client.get("/ui").text
            lingering = EventReader(running.url, cookies=client.cookies)
            stopping = time.monotonic()
        finally:
            reader.close()
            client.close()
    # serve stopped (SIGTERM, exit 0) with a page's stream still open, without waiting for it
    assert time.monotonic() - stopping < 10
    lingering.close()
    for secret in secrets_of(server, keys):
        assert secret not in text
        assert secret not in running.stderr
    assert "access_token" not in text


def test_events_coalesce_to_one_update_per_second_per_item() -> None:
    """A burst of 200 bus events for one provider, each changing its state, gives at most
    one event per second for that item, and the last one carries the latest state."""
    state = {"n": 0}
    bus = EventBus()

    def snapshot() -> Snapshot:
        return Snapshot({"provider:p": {"n": state["n"]}})

    async def main() -> list[Any]:
        feed = StatusFeed(snapshot, bus.subscribe)
        got: list[Any] = []

        def wake() -> None:
            while (event := subscription.pop()) is not None:
                got.append((time.monotonic(), event))

        subscription = feed.subscribe(wake)
        for _ in range(200):
            state["n"] += 1
            bus.emit(TokenAcquired("p", "", background=True, duration=0, expires_in=60))
            await asyncio.sleep(0.01)
        async with asyncio.timeout(5):
            while not got or got[-1][1].data != {"n": 200}:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # nothing more comes once the latest state is out
        subscription.close()
        await feed.stop()
        return got

    got = asyncio.run(main())
    times = [t for t, _ in got]
    assert 2 <= len(got) <= 5, [e.data for _, e in got]
    assert all(b - a >= 0.9 for a, b in zip(times, times[1:], strict=False)), times
    assert got[-1][1].data == {"n": 200}


def test_refusals(server: AuthorizationServer, tmp_path: Path) -> None:
    """No admin: 403 on /ui (login and bearer) and /v1/events; no session: a redirect to the
    login form; a forged or expired session cookie: the same redirect; a POST without or with
    a wrong CSRF token: 403 and no job started; logout ends the session."""
    keys = Keys()
    with serving(tmp_path, server, keys) as running:
        url = running.url
        plain, refused = log_in(url, keys.plain)
        assert refused.status_code == 403 and "admin" in refused.text
        assert not any("tb_session" in c for c in refused.headers.get_list("set-cookie"))
        plain.close()
        bearer = httpx.get(url + "/ui", headers={"Authorization": f"Bearer {keys.plain}"})
        assert bearer.status_code == 403
        events = httpx.get(url + "/v1/events", headers={"Authorization": f"Bearer {keys.plain}"})
        assert events.status_code == 403
        assert httpx.get(url + "/v1/events").status_code == 401
        anonymous = httpx.get(url + "/ui")
        assert anonymous.status_code == 303 and anonymous.headers["location"] == "/ui/login"
        wrong = log_in(url, "tbk_" + "x" * 43)
        assert wrong[1].status_code == 401 and "not valid" in wrong[1].text
        wrong[0].close()

        client, _ = log_in(url, keys.admin)
        cookie = client.cookies["tb_session"]
        body, _, signature = cookie.partition(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        for forged in (
            body + "." + signature[:-2] + ("AA" if not signature.endswith("AA") else "BB"),
            base64.urlsafe_b64encode(json.dumps({**claims, "c": "dev"}).encode())
            .decode()
            .rstrip("=")
            + "."
            + signature,
            base64.urlsafe_b64encode(json.dumps({**claims, "e": int(time.time()) - 5}).encode())
            .decode()
            .rstrip("=")
            + "."
            + signature,
            "garbage",
        ):
            forger = httpx.Client(base_url=url, cookies={"tb_session": forged})
            answer = forger.get("/ui")
            assert answer.status_code == 303 and answer.headers["location"] == "/ui/login"
            assert forger.get("/v1/events").status_code == 401
            forger.close()

        before = len(jobs_of(url, keys.admin))
        csrf = page_csrf(client)
        for token in (None, "wrong", csrf[:-1] + ("A" if csrf[-1] != "A" else "B")):
            data = {"kind": "refresh", "provider": "svc"}
            if token is not None:
                data["csrf"] = token
            answer = client.post("/ui/jobs", data=data)
            assert answer.status_code == 403, answer.text
        other, _ = log_in(url, keys.admin)  # another session's token is refused too
        other_csrf = page_csrf(other)
        assert other_csrf != csrf
        answer = client.post(
            "/ui/jobs", data={"kind": "refresh", "provider": "svc", "csrf": other_csrf}
        )
        assert answer.status_code == 403
        assert len(jobs_of(url, keys.admin)) == before
        unknown = client.post(
            "/ui/jobs",
            data={"kind": "refresh", "provider": "nope", "csrf": csrf},
            headers={"Accept": "application/json"},
        )
        assert unknown.status_code == 400 and len(jobs_of(url, keys.admin)) == before

        out = client.post("/ui/logout", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
        cleared = next(c for c in out.headers.get_list("set-cookie") if "tb_session=" in c)
        assert 'tb_session=""' in cleared and "Max-Age=0" in cleared
        assert client.get("/ui").status_code == 303
        other.close()
        client.close()


def test_reauthorise_revives_a_dead_provider_live(server: StageServer, tmp_path: Path) -> None:
    """The Re-authorise flow without a browser: rt is reauthorization_required; the page's
    POST starts an authorize job whose answer (and GET /ui/jobs/{id}) carries the
    authorize_url; the job shows on /v1/events in phase waiting_for_user; httpx follows the
    authorization server's login and consent forms to the broker's callback ("Connected");
    /v1/events then turns rt valid and the job done, and the running-jobs gauge is back to
    0 after counting the job."""
    keys = Keys()
    with serving(tmp_path, server, keys) as running:
        kill_rt(server, running.url, keys.admin)
        client, _ = log_in(running.url, keys.admin)
        reader = EventReader(running.url, cookies=client.cookies)
        try:
            reader.wait(
                lambda n, d: (
                    d["item"] == "provider:rt" and d["state"] == "reauthorization_required"
                ),
                "rt to be reauthorization_required",
            )
            started = client.post(
                "/ui/jobs",
                data={"kind": "authorize", "provider": "rt", "csrf": page_csrf(client)},
                headers={"Accept": "application/json"},
            )
            assert started.status_code == 202, started.text
            job_id = started.json()["job"]["job_id"]
            url = started.json()["authorize_url"]
            assert url and url.startswith(server.authorize_url + "?")
            assert client.get(f"/ui/jobs/{job_id}").json()["authorize_url"] == url
            reader.wait(
                lambda n, d: (
                    n == "job"
                    and d["job_id"] == job_id
                    and d["kind"] == "authorize"
                    and d["status"] == "running"
                    and d["phase"] == "waiting_for_user"
                ),
                "the authorize job waiting for the user",
            )
            gauge = 'tokenbroker_jobs_running{kind="authorize"}'
            assert f"{gauge} 1.0" in client.get("/metrics").text

            landing = complete_authorization(url, username=USER, password=PASSWORD)
            assert landing.startswith(server.callback + "?")
            page = httpx.get(landing, timeout=30)
            assert page.status_code == 200 and "Connected" in page.text
            reader.wait(
                lambda n, d: n == "job" and d["job_id"] == job_id and d["status"] == "done",
                "the authorize job to reach done",
            )
            reader.wait(
                lambda n, d: d["item"] == "provider:rt" and d["state"] == "valid",
                "rt to turn valid",
            )
            assert f"{gauge} 0.0" in client.get("/metrics").text
            text = "".join(reader.raw)
        finally:
            reader.close()
            client.close()
    assert url not in text  # the URL (its state) is never streamed
    for secret in secrets_of(server, keys):
        assert secret not in text


def test_a_waiting_client_shows_as_the_pools_oldest_wait(
    server: StageServer, tmp_path: Path
) -> None:
    """Two proxy clients hold /db/'s two accounts and a third waits: /v1/events shows the
    pool with one waiting client and an oldest wait that grows past a second (not "-"), and
    the page renders it; once the clients leave, nobody waits and it is None again."""
    keys = Keys()
    with serving(tmp_path, server, keys) as running:
        client, _ = log_in(running.url, keys.admin)
        reader = EventReader(running.url, cookies=client.cookies)
        sockets: list[socket.socket] = []
        try:
            for n in range(3):
                sock = socket.create_connection(("127.0.0.1", server.proxy_port), timeout=10)
                sock.sendall(f"GET /db/{n} HTTP/1.1\r\nHost: db\r\n\r\n".encode())
                sockets.append(sock)
            waiting = reader.wait(
                lambda n, d: (
                    d["item"] == "pool:/db/" and d["waiting"] == 1 and (d["oldest_wait"] or 0) >= 1
                ),
                "a client waiting over a second in /db/'s pool",
            )
            assert waiting["leased"] == 2
            row = client.get("/ui").text.split('data-item="pool:/db/"')[1].split("</tr>")[0]
            assert '<td class="oldest_wait">-</td>' not in row and " s</td>" in row
        finally:
            for sock in sockets:
                sock.close()
        idle = reader.wait(
            lambda n, d: d["item"] == "pool:/db/" and d["waiting"] == 0 and d["idle"] == 2,
            "the pool idle again",
        )
        assert idle["oldest_wait"] is None
        reader.close()
        client.close()


def test_the_session_cookie_is_secure_over_tls(make_broker: Any) -> None:
    """A login over https (the ASGI scope's scheme, as uvicorn sets it for TLS or a trusted
    proxy's X-Forwarded-Proto) gets a Secure session cookie; over http it is not Secure."""
    from tokenbroker.api.app import create_app
    from tokenbroker.engine.consumers import hash_key, new_key

    key = new_key()
    consumers = {"ops": {"api_key_sha256": hash_key(key), "allow": ["svc", "admin"]}}
    app = create_app(make_broker(sections={"consumers": consumers}))

    async def login(base: str) -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base) as client:
            form = await client.get("/ui/login")
            token = form.text.split('name="csrf" value="')[1].split('"')[0]
            answer = await client.post("/ui/login", data={"key": key, "csrf": token})
            assert answer.status_code == 303
            return next(c for c in answer.headers.get_list("set-cookie") if "tb_session=" in c)

    secure = asyncio.run(login("https://broker.example"))
    plain = asyncio.run(login("http://broker.example"))
    assert "secure" in {p.strip().lower() for p in secure.split(";")}
    assert "secure" not in {p.strip().lower() for p in plain.split(";")}
    assert key not in secure
