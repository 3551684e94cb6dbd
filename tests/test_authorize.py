"""Re-authorisation by authorization code + PKCE (issue 18 items 1 and 4): the ``authorize``
job and ``GET /v1/oauth/callback`` against the bundled authorization server, the API served
on a real socket, the store a SQLite file shared by a second broker; and the negative cases,
each of which leaves the credential row exactly as it was."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from click.testing import CliRunner

from redis_server import RedisServer, require_redis
from support import free_port, stampede, wait_for
from tokenbroker import Broker, parse_settings
from tokenbroker.api.app import create_app
from tokenbroker.cli.main import main
from tokenbroker.config import JobsSettings
from tokenbroker.core.crypto import generate_key
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.errors import ConfigError, ReauthorizationRequiredError
from tokenbroker.jobs.service import JobService
from tokenbroker.testing import AuthorizationFlowError, AuthorizationServer, complete_authorization
from tokenbroker.testing.asgi import ServedApp

USER, PASSWORD = "alice", "wonder-land-pw"
CLIENT = "rt-client"
SCOPES = ["openid", "offline_access", "read"]
FAST = {"heartbeat_seconds": 0.2, "lease_seconds": 1.0, "poll_seconds": 0.05}
KEY = generate_key()


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


class World:
    """A strict-rotation authorization server; providers ``tesla`` and ``other`` (dead
    refresh tokens, ``authorization`` blocks) on a SQLite store; the API with its jobs running
    served on ``port``; a consumer ``ops`` allowed both and ``jobs``."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        run: bool = True,
        redis: str | None = None,
        store: str | None = None,
        **blocks: dict[str, Any],
    ) -> None:
        self.port = free_port()
        self.callback = f"http://127.0.0.1:{self.port}/v1/oauth/callback"
        self.server = AuthorizationServer(rotation="strict")
        self.server.add_account(USER, PASSWORD)
        self.server.add_client(
            CLIENT, auth_method="none", scopes=" ".join(SCOPES), redirect_uris=[self.callback]
        )
        self.server.start()
        self.key = new_key()
        self.seeds = {}
        providers = {}
        for name in ("tesla", "other"):
            seed = self.server.issue_refresh_token(CLIENT, "offline_access read")
            self.seeds[name] = seed
            block = {
                "issuer": self.server.issuer,
                "redirect_uri": self.callback,
                "scopes": SCOPES,
                "params": {"prompt": "consent"},
                **blocks.get(name, {}),
            }
            block = {
                k: v.format(authorize_url=self.server.authorize_url) if isinstance(v, str) else v
                for k, v in block.items()
                if v is not None
            }
            providers[name] = {
                "grant": "refresh_token",
                "token_url": self.server.token_url,
                "client_id": CLIENT,
                "refresh_token": seed,
                "authorization": block,
            }
        self.config = {
            "store": store or f"sqlite:///{tmp_path / 'tb.db'}",
            "encryption_keys": [KEY],
            "defaults": {"retries": 0},
            "providers": providers,
            "consumers": {
                "ops": {"api_key_sha256": hash_key(self.key), "allow": ["tesla", "other", "jobs"]}
            },
            **({"redis": redis} if redis else {}),
        }
        self.broker = self.new_broker()
        self.service = JobService(self.broker, settings=JobsSettings(**FAST))
        if run:
            self.service.start_background()
        self.served = ServedApp(create_app(self.broker, job_service=self.service), port=self.port)
        self.served.start()
        self.url = self.served.url
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.others: list[Broker] = []

    def new_broker(self) -> Broker:
        return Broker(parse_settings(yaml.safe_dump(self.config), {}))

    def kill(self, name: str) -> None:
        """Spend the seed outside the broker, so the broker's refresh is a reuse: the server
        revokes the family and the credential becomes reauthorization_required."""
        reply = httpx.post(
            self.server.token_url,
            data={
                "grant_type": "refresh_token",
                "refresh_token": self.seeds[name],
                "client_id": CLIENT,
            },
        )
        assert reply.status_code == 200
        with pytest.raises(ReauthorizationRequiredError):
            self.broker.get_token(name)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def start(self, provider: str = "tesla") -> dict[str, Any]:
        reply = self.http.post(
            "/v1/jobs",
            json={"kind": "authorize", "params": {"provider": provider}},
            headers=self.auth,
        )
        assert reply.status_code == 202, reply.text
        body: dict[str, Any] = reply.json()
        return body

    def job(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get(f"/v1/jobs/{job_id}", headers=self.auth).json()
        return body

    def row(self, provider: str = "tesla") -> tuple[Any, ...]:
        """What the credential row holds: state, versions, refresh and access token."""
        row = self.broker.store.load(provider)
        assert row is not None
        return (
            row.state,
            row.rt_version,
            row.seed_digest,
            row.refresh_token.reveal() if row.refresh_token else None,
            row.token.token.access_token if row.token else None,
        )

    def sign_in(self, authorize_url: str, approve: bool = True) -> str:
        return complete_authorization(
            authorize_url, username=USER, password=PASSWORD, approve=approve
        )

    def close(self) -> None:
        self.http.close()
        self.served.stop()
        self.service.stop_background()
        for broker in [self.broker, *self.others]:
            broker.close()
        self.server.stop()


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    made: list[World] = []

    def factory(**kw: Any) -> World:
        made.append(World(tmp_path, **kw))
        return made[-1]

    yield factory
    for world in made:
        world.close()


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


def test_authorize_revives_a_dead_credential_without_restart(world: World) -> None:
    """A reauthorization_required provider: the job's URL (PKCE S256, state, exact redirect
    URI) leads through login and consent to the callback, which answers "Connected" with the
    page's security headers; the job went waiting_for_user → exchanging_code → verifying →
    done, the old chain ended, and the same broker serves a new token without a restart."""
    world.kill("tesla")
    before = world.row()
    assert before[0] == "reauthorization_required"
    started = world.start()
    url = started["authorize_url"]
    sent = query(url)
    assert sent["code_challenge_method"] == "S256" and len(sent["code_challenge"]) == 43
    assert sent["redirect_uri"] == world.callback and sent["scope"] == " ".join(SCOPES)
    assert len(sent["state"]) >= 43
    shown = world.job(started["job_id"])
    assert shown["status"] == "running" and shown["phase"] == "waiting_for_user"
    assert shown["authorize_url"] == url

    landing = world.sign_in(url)
    assert landing.startswith(world.callback + "?")
    page = httpx.get(landing, timeout=30)
    assert page.status_code == 200 and "Connected. You can close this window." in page.text
    assert page.headers["content-security-policy"] == "default-src 'none'"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-store"

    done = world.job(started["job_id"])
    assert done["status"] == "done" and done["error"] is None and "authorize_url" not in done
    with world.http.stream(
        "GET", f"/v1/jobs/{started['job_id']}/stream", headers=world.auth
    ) as stream:
        text = stream.read().decode()
    phases = [
        line.split('"phase":"')[1].split('"')[0]
        for line in text.splitlines()
        if '"phase":"' in line
    ]
    assert phases == ["waiting_for_user", "exchanging_code", "verifying"]
    assert "event: completed" in text

    after = world.row()
    assert after[0] == "active" and after[1] > before[1] and after[2] == before[2]
    assert after[3] not in (before[3], world.seeds["tesla"])
    token = world.broker.get_token("tesla")
    assert token.access_token == after[4]
    # The new chain rotates normally: a forced refresh presents the new refresh token once.
    world.broker.invalidate("tesla", token.access_token)
    assert world.broker.get_token("tesla").access_token != token.access_token
    assert world.server.reused_refresh_tokens() == {world.seeds["tesla"]}
    authorize_requests = [r for r in world.server.requests if r.path == "/authorize"]
    assert authorize_requests
    assert all(r.query["code_challenge_method"] == ["S256"] for r in authorize_requests)
    assert not any(r.form.get("code_challenge_method") == "plain" for r in world.server.requests)


def test_a_second_broker_on_the_store_serves_the_new_token(world: World) -> None:
    """Another broker on the same store that never cached the failure reads the new token."""
    world.kill("tesla")
    other = world.new_broker()
    world.others.append(other)
    started = world.start()
    assert httpx.get(world.sign_in(started["authorize_url"]), timeout=30).status_code == 200
    assert other.get_token("tesla").access_token == world.row()[4]


def test_a_broker_that_remembered_the_error_learns_from_the_store(world: World) -> None:
    """Without Redis: another broker on the store that cached reauthorization_required looks
    at the credential's row (at most every 2 s) and serves the new token, no restart; while
    the row is dead it keeps the 409 and asks the provider nothing."""
    world.kill("tesla")
    other = world.new_broker()
    world.others.append(other)
    with pytest.raises(ReauthorizationRequiredError):
        other.get_token("tesla")
    refreshes = world.server.count("refresh_token")
    for _ in range(3):
        with pytest.raises(ReauthorizationRequiredError):
            other.get_token("tesla")
    assert world.server.count("refresh_token") == refreshes
    started = world.start()
    assert httpx.get(world.sign_in(started["authorize_url"]), timeout=30).status_code == 200

    def served() -> bool:
        try:
            return other.get_token("tesla").access_token == world.row()[4]
        except ReauthorizationRequiredError:
            return False

    wait_for(served, "the other broker to serve the new token", 10)
    assert world.server.count("refresh_token") == refreshes


def test_the_flow_on_postgresql_with_a_second_broker(
    make_world: Callable[..., World], pg_url: str
) -> None:
    """The same on a real PostgreSQL store: the callback finishes the job in one broker's
    API, and a second broker on the store that remembered the error serves the new token."""
    world = make_world(store=pg_url)
    world.kill("tesla")
    before = world.row()
    other = world.new_broker()
    world.others.append(other)
    with pytest.raises(ReauthorizationRequiredError):
        other.get_token("tesla")
    started = world.start()
    page = httpx.get(world.sign_in(started["authorize_url"]), timeout=30)
    assert page.status_code == 200, page.text
    assert world.job(started["job_id"])["status"] == "done"
    after = world.row()
    assert after[0] == "active" and after[1] > before[1]
    assert world.broker.get_token("tesla").access_token == after[4]

    def served() -> bool:
        try:
            return other.get_token("tesla").access_token == after[4]
        except ReauthorizationRequiredError:
            return False

    wait_for(served, "the other broker to serve the new token", 10)


def test_every_broker_forgets_its_remembered_error_through_redis(
    make_world: Callable[..., World],
) -> None:
    """Cluster mode: a second broker that remembered reauthorization_required learns of the
    re-authorisation through the Redis fan-out and serves the new token (no restart)."""
    require_redis()
    redis = RedisServer()
    redis.start()
    try:
        world = make_world(redis=redis.url)
        other = world.new_broker()
        world.others.append(other)
        wait_for(
            lambda: all(b.coordinator.listening for b in (world.broker, other)),  # type: ignore[union-attr]
            "redis subscriptions",
        )
        world.kill("tesla")
        with pytest.raises(ReauthorizationRequiredError):
            other.get_token("tesla")
        assert [s.state for s in other.states()] == ["reauthorization_required"]
        started = world.start()
        assert httpx.get(world.sign_in(started["authorize_url"]), timeout=30).status_code == 200
        # Nobody asks the other broker for a token meanwhile, so only the notice can clear
        # its remembered error (the store look of engine/revival.py runs inside get_token).
        wait_for(
            lambda: "reauthorization_required" not in [s.state for s in other.states()],
            "the Redis notice to reach the other broker",
            10,
        )
        assert other.get_token("tesla").access_token == world.row()[4]
    finally:
        redis.close()


def test_a_replayed_callback_gets_400_and_changes_nothing(world: World) -> None:
    """The state is spent by the first callback: the same answer again is refused."""
    world.kill("tesla")
    landing = world.sign_in(world.start()["authorize_url"])
    assert httpx.get(landing, timeout=30).status_code == 200
    after_first = world.row()
    replay = httpx.get(landing, timeout=30)
    assert replay.status_code == 400 and "Unknown, used or expired" in replay.text
    assert world.row() == after_first


def test_a_replay_while_the_code_is_exchanged_gets_400(world: World) -> None:
    """The same answer again while the first callback is still at the (slow) token endpoint:
    the state is spent and the job held, so the replay gets 400 and the code is exchanged
    once."""
    world.kill("tesla")
    started = world.start()
    landing = world.sign_in(started["authorize_url"])
    world.server.latency = 1.0
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.get, landing, timeout=30)
        wait_for(
            lambda: world.job(started["job_id"])["phase"] == "exchanging_code",
            "the first callback to reach the exchange",
        )
        replay = httpx.get(landing, timeout=30)
        assert first.result().status_code == 200
    assert replay.status_code == 400
    assert world.server.count("authorization_code") == 1


def test_concurrent_callbacks_with_one_state_exchange_the_code_once(world: World) -> None:
    """Five browsers deliver the same answer at once: one is connected, four get 400, and
    the server sees one code exchange (a second would revoke what the first issued)."""
    world.kill("tesla")
    landing = world.sign_in(world.start()["authorize_url"])
    codes = stampede(5, lambda: httpx.get(landing, timeout=30).status_code)
    assert sorted(codes) == [200, 400, 400, 400, 400]  # type: ignore[type-var]
    assert world.server.count("authorization_code") == 1
    assert world.broker.get_token("tesla").access_token == world.row()[4]


def test_the_state_of_another_job_does_not_finish_this_one(world: World) -> None:
    """A code obtained for one job, sent with another job's state, fails that other job at the
    token endpoint (its PKCE verifier does not match) and changes neither credential; the
    first job still waits for its own answer."""
    world.kill("tesla")
    world.kill("other")
    rows = world.row("tesla"), world.row("other")
    first, second = world.start("tesla"), world.start("other")
    landing = query(world.sign_in(first["authorize_url"]))
    foreign = query(second["authorize_url"])["state"]
    mixed = httpx.get(
        world.callback, params={"code": landing["code"], "state": foreign, "iss": landing["iss"]}
    )
    assert mixed.status_code == 400
    failed = world.job(second["job_id"])
    assert failed["status"] == "failed" and failed["error"]["type"] == "exchange_failed"
    assert world.job(first["job_id"])["phase"] == "waiting_for_user"
    assert (world.row("tesla"), world.row("other")) == rows


def test_an_expired_state_is_refused_and_the_job_fails_expired(
    make_world: Callable[..., World],
) -> None:
    """Past its expiry the state is refused (400) and the job ends failed / expired; with the
    job loop running the reaper ends such a job on its own, never as worker_lost."""
    world = make_world(run=False, tesla={"expires_in_seconds": 1}, other={"expires_in_seconds": 1})
    world.kill("tesla")
    before = world.row()
    started = world.start()
    landing = world.sign_in(started["authorize_url"])
    record = world.broker.store.job(started["job_id"])
    assert record is not None
    wait_for(lambda: world.broker.store.now() > record.created_at + 1.2, "the state to expire", 5)
    late = httpx.get(landing, timeout=30)
    assert late.status_code == 400 and "expired" in late.text
    job = world.job(started["job_id"])
    assert job["status"] == "failed" and job["error"]["type"] == "expired"
    assert world.row() == before

    world.service.start_background()
    waiting = world.start("other")
    assert world.job(waiting["job_id"])["phase"] == "waiting_for_user"
    wait_for(lambda: world.job(waiting["job_id"])["status"] == "failed", "the reaper", 10)
    assert world.job(waiting["job_id"])["error"]["type"] == "expired"


def test_a_waiting_job_is_not_reaped_as_worker_lost(world: World) -> None:
    """Its lease is released at once, yet while its state is valid the reaper leaves it."""
    started = world.start()
    for _ in range(5):  # several reaper passes (poll 0.05 s, lease 1 s)
        world.service.wake()
        threading.Event().wait(0.3)
    job = world.job(started["job_id"])
    assert job["status"] == "running" and job["phase"] == "waiting_for_user"


def test_a_forged_iss_fails_the_job_as_a_possible_mix_up(world: World) -> None:
    """The server advertises authorization_response_iss_parameter_supported: an answer with
    another iss fails the job and changes nothing."""
    world.kill("tesla")
    before = world.row()
    started = world.start()
    world.server.authorization.forge_next_iss("https://evil.example")
    landing = world.sign_in(started["authorize_url"])
    assert query(landing)["iss"] == "https://evil.example"
    page = httpx.get(landing, timeout=30)
    assert page.status_code == 400 and "mix-up" in page.text
    job = world.job(started["job_id"])
    assert job["status"] == "failed" and job["error"]["type"] == "possible_mix_up"
    assert world.server.count("authorization_code") == 0
    assert world.row() == before


def test_a_missing_iss_is_refused_when_the_server_sends_it(world: World) -> None:
    """RFC 9207 §2.4: a server that advertises iss must send it; an answer without it fails."""
    world.kill("tesla")
    before = world.row()
    started = world.start()
    landing = query(world.sign_in(started["authorize_url"]))
    page = httpx.get(world.callback, params={"code": landing["code"], "state": landing["state"]})
    assert page.status_code == 400
    assert world.job(started["job_id"])["error"]["type"] == "possible_mix_up"
    assert world.row() == before


def test_an_unregistered_redirect_uri_gets_the_servers_error_page(
    make_world: Callable[..., World],
) -> None:
    """A redirect URI the server does not know: its own error page, no redirect to it."""
    world = make_world(tesla={"redirect_uri": "http://127.0.0.1:9/v1/oauth/callback"})
    world.kill("tesla")
    before = world.row()
    url = world.start()["authorize_url"]
    reply = httpx.get(url, timeout=30)
    assert reply.status_code == 400 and "location" not in reply.headers
    with pytest.raises(AuthorizationFlowError):
        world.sign_in(url)
    assert world.row() == before


def test_a_reply_without_a_refresh_token_fails_the_job(make_world: Callable[..., World]) -> None:
    """Without prompt=consent the server drops offline_access and issues no refresh token:
    the job fails no_refresh_token and the credential stays as it was."""
    world = make_world(tesla={"params": {}})
    world.kill("tesla")
    before = world.row()
    started = world.start()
    page = httpx.get(world.sign_in(started["authorize_url"]), timeout=30)
    assert page.status_code == 400 and "no refresh token" in page.text
    assert world.server.count("authorization_code") == 1
    job = world.job(started["job_id"])
    assert job["status"] == "failed" and job["error"]["type"] == "no_refresh_token"
    assert world.row() == before


def test_denial_fails_the_job_with_the_providers_error_code(world: World) -> None:
    """error=access_denied ends the job failed / access_denied; nothing is exchanged."""
    world.kill("tesla")
    before = world.row()
    started = world.start()
    landing = world.sign_in(started["authorize_url"], approve=False)
    assert query(landing)["error"] == "access_denied"
    page = httpx.get(landing, timeout=30)
    assert page.status_code == 400 and "access_denied" in page.text
    job = world.job(started["job_id"])
    assert job["status"] == "failed" and job["error"]["type"] == "access_denied"
    assert world.server.count("authorization_code") == 0
    metrics = world.http.get("/metrics").text
    assert 'kind="authorize",status="failed"' in metrics
    assert world.row() == before


def test_the_page_never_echoes_the_query(world: World) -> None:
    """An error code that is not a plain word is not repeated, and nothing is unescaped."""
    started = world.start()
    state = query(started["authorize_url"])["state"]
    evil = "<script>alert(1)</script>"
    page = httpx.get(
        world.callback,
        params={
            "error": evil,
            "state": state,
            "iss": world.server.issuer,
            "error_description": evil,
        },
    )
    assert page.status_code == 400 and "<script>" not in page.text and "alert" not in page.text
    assert world.job(started["job_id"])["error"]["type"] == "authorization_error"
    for params in ({}, {"state": "nope"}, {"state": "x" * 600}):
        assert httpx.get(world.callback, params=params).status_code == 400
    twice = httpx.get(world.callback + f"?state={state}&state={state}")
    assert twice.status_code == 400


def test_authorize_params_are_checked(world: World) -> None:
    """Only refresh-token providers with an authorization block; no account."""
    bad = world.http.post(
        "/v1/jobs",
        json={"kind": "authorize", "params": {"provider": "tesla", "account": "x"}},
        headers=world.auth,
    )
    assert bad.status_code == 400 and "account" in bad.text


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"redirect_uri": "http://broker.example/cb"}, "must use https"),
        ({"authorize_url": "ftp://x"}, "absolute http(s) URL"),
        ({"params": {"state": "x"}}, "state is set by the broker"),
        ({"issuer": None}, "needs authorize_url"),
        ({"scopes": ["a b"]}, "scope-token"),
    ],
)
def test_the_authorization_block_is_validated(block: dict[str, Any], message: str) -> None:
    """Clear errors naming the field; https, or http on loopback only."""
    config = {
        "store": "memory",
        "providers": {
            "tesla": {
                "grant": "refresh_token",
                "token_url": "https://idp.example/token",
                "client_id": "c",
                "refresh_token": "r",
                "authorization": {
                    "issuer": "https://idp.example",
                    "redirect_uri": "https://broker.example/v1/oauth/callback",
                    **block,
                },
            }
        },
    }
    config["providers"]["tesla"]["authorization"] = {
        k: v for k, v in config["providers"]["tesla"]["authorization"].items() if v is not None
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(yaml.safe_dump(config), {})
    assert "providers.tesla.authorization" in str(caught.value)
    assert message in str(caught.value)


def test_cli_authorize_prints_the_url_and_exits_0_when_connected(world: World) -> None:
    """`tokenbroker authorize tesla` starts the job, prints its URL, follows the stream and
    exits 0 once the person (here: a thread) has completed the flow."""
    world.kill("tesla")

    def person() -> None:
        def waiting() -> list[dict[str, Any]]:
            jobs = world.http.get("/v1/jobs?kind=authorize", headers=world.auth).json()["jobs"]
            return [j for j in jobs if j.get("authorize_url")]

        wait_for(lambda: bool(waiting()), "the CLI's job", 20)
        httpx.get(world.sign_in(waiting()[0]["authorize_url"]), timeout=30)

    helper = threading.Thread(target=person)
    helper.start()
    result = CliRunner().invoke(
        main, ["authorize", "tesla", "--url", world.url, "--key", world.key], catch_exceptions=False
    )
    helper.join(30)
    assert result.exit_code == 0, result.output
    assert "/authorize?" in result.output and "connected" in result.output.lower()
    assert world.broker.get_token("tesla").access_token == world.row()[4]


def test_cli_authorize_exits_non_zero_with_the_reason(world: World) -> None:
    """A denial ends the CLI with a non-zero code naming access_denied."""

    def person() -> None:
        def waiting() -> list[dict[str, Any]]:
            jobs = world.http.get("/v1/jobs?kind=authorize", headers=world.auth).json()["jobs"]
            return [j for j in jobs if j.get("authorize_url")]

        wait_for(lambda: bool(waiting()), "the CLI's job", 20)
        httpx.get(world.sign_in(waiting()[0]["authorize_url"], approve=False), timeout=30)

    helper = threading.Thread(target=person)
    helper.start()
    result = CliRunner().invoke(
        main, ["authorize", "tesla", "--url", world.url, "--key", world.key]
    )
    helper.join(30)
    assert result.exit_code != 0 and "access_denied" in result.output


def test_no_secret_of_the_flow_reaches_a_log_or_the_job(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The state, the code, the refresh and access tokens appear in no log line, and the
    stored job keeps the state only hashed (the verifier and URL sealed)."""
    caplog.set_level(logging.DEBUG, logger="tokenbroker")
    world.kill("tesla")
    started = world.start()
    stored = world.broker.store.job(started["job_id"])
    assert stored is not None
    state = query(started["authorize_url"])["state"]
    assert state not in stored.document and "code_challenge" not in stored.document
    landing = world.sign_in(started["authorize_url"])
    assert httpx.get(landing, timeout=30).status_code == 200
    secrets_seen = [state, query(landing)["code"], *world.row()[3:5]]
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "authorization done" in text
    assert not [s for s in secrets_seen if s and s in text]
    final = world.broker.store.job(started["job_id"])
    assert final is not None and '"authorization"' not in final.document


def test_a_canceled_authorization_ends_canceled_and_refuses_its_answer(world: World) -> None:
    """Cancel while waiting: the job ends canceled (no worker needed), its answer gets 400."""
    world.kill("tesla")
    before = world.row()
    started = world.start()
    canceled = world.http.post(f"/v1/jobs/{started['job_id']}/cancel", headers=world.auth)
    assert canceled.status_code == 200
    wait_for(lambda: world.job(started["job_id"])["status"] == "canceled", "the cancel", 10)
    landing = world.sign_in(started["authorize_url"])
    assert httpx.get(landing, timeout=30).status_code == 400
    assert world.server.count("authorization_code") == 0
    assert world.row() == before


def test_without_discovery_the_configured_endpoint_is_used(
    make_world: Callable[..., World],
) -> None:
    """authorize_url alone (no issuer, no discovery document): the flow works and iss, not
    advertised to the broker, is not required."""
    world = make_world(tesla={"issuer": None, "authorize_url": "{authorize_url}"})
    world.kill("tesla")
    started = world.start()
    assert started["authorize_url"].startswith(world.server.authorize_url + "?")
    landing = query(world.sign_in(started["authorize_url"]))
    page = httpx.get(world.callback, params={"code": landing["code"], "state": landing["state"]})
    assert page.status_code == 200
    assert not [r for r in world.server.requests if r.path.startswith("/.well-known/")]
    assert world.broker.get_token("tesla").access_token == world.row()[4]


def test_discovery_failure_fails_the_job_at_once(make_world: Callable[..., World]) -> None:
    """An issuer whose metadata cannot be fetched: the job ends failed / discovery_failed,
    with no authorize_url, and the credential is untouched."""
    world = make_world(tesla={"issuer": "http://127.0.0.1:9/nowhere"})
    world.kill("tesla")
    before = world.row()
    started = world.start()
    assert "authorize_url" not in started
    job = world.job(started["job_id"])
    assert job["status"] == "failed" and job["error"]["type"] == "discovery_failed"
    assert world.row() == before


def test_rotate_key_reseals_an_authorization_in_flight(make_world: Callable[..., World]) -> None:
    """An authorize job waits for the person under the old key; a rotate_key job (new key
    first, old key second) counts it as an item and re-seals its verifier and URL, so a
    broker configured with the new key alone still finishes the sign-in ("Connected") and
    serves the new token; the job's state and phase are untouched by the re-sealing."""
    world = make_world(run=False)
    world.kill("tesla")
    started = world.start()
    job_id = started["job_id"]
    new = generate_key()
    world.config["encryption_keys"] = [new, KEY]
    both = world.new_broker()
    world.others.append(both)
    rotating = JobService(both, settings=JobsSettings(**FAST))
    rotating.start_background()
    try:
        job, _ = rotating.start("rotate_key", {}, "ops")
        wait_for(lambda: rotating.require(job.job_id).status.value == "done", "rotate_key done")
        rotated = rotating.require(job.job_id)
    finally:
        rotating.stop_background()
    assert rotated.items.ok == rotated.items.total and rotated.items.failed == 0
    document = both.store.job(job.job_id).document  # its items: rows and authorize jobs
    assert f"authorize_job/{job_id}" in document, document
    waiting = world.job(job_id)
    assert (waiting["status"], waiting["phase"]) == ("running", "waiting_for_user")

    world.config["encryption_keys"] = [new]
    only_new = world.new_broker()
    world.others.append(only_new)
    finishing = JobService(only_new, settings=JobsSettings(**FAST))
    assert (
        finishing.authorizations.authorize_url(only_new.store.job(job_id))
        == started["authorize_url"]
    )
    landing = world.sign_in(started["authorize_url"])
    outcome = finishing.authorizations.complete(query(landing))
    assert outcome.ok, outcome.message
    assert finishing.require(job_id).status.value == "done"
    row = only_new.store.load("tesla")  # (the world's broker, old key only, cannot read it)
    assert row is not None and row.state == "active" and row.token is not None
    assert only_new.get_token("tesla").access_token == row.token.token.access_token
