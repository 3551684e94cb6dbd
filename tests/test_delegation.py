"""Delegated tokens: minted JWTs bound to audience and object, upstream delegation, 302 redirects;
who may delegate, for which subject and object, and what the token and the audit line name."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from conftest import BrokerFactory
from support import (
    CLIENT_ID,
    CLIENT_SECRET,
    Served,
    client_credentials,
    free_port,
    http_status,
    terminate,
    wait_for,
)
from tokenbroker import Broker, ProviderUnavailableError, UnknownProviderError, parse_settings
from tokenbroker.api.app import create_app
from tokenbroker.core.crypto import generate_key
from tokenbroker.core.rules import parse_rule
from tokenbroker.engine.consumers import ConsumerRegistry, hash_key, new_key
from tokenbroker.errors import DelegationFailedError
from tokenbroker.testing import AuthorizationServer

KEY = new_key()  # web: delegate-as:files, delegate:twin
APP_KEY = new_key()  # app: delegate:files, subject svc-app
READER_KEY = new_key()  # reader: token rules for files and twin, no delegation rule
STORE_KEY = generate_key()
AUDIENCE = "https://files.example"


class DelegationUpstream:
    """A delegation endpoint that accepts only live tokens of the test IdP and can fail on cue."""

    def __init__(self, idp: AuthorizationServer) -> None:
        self.idp = idp
        self.calls: list[dict[str, Any]] = []
        self.fail_with: list[int] = []
        #: Fields of the next successful replies, besides the token (one dict per reply).
        self.replies: list[dict[str, Any]] = []
        app = FastAPI()

        @app.post("/file-access/download-tokens")
        async def issue(request: Request) -> JSONResponse:
            body = await request.json()
            self.calls.append({"auth": request.headers.get("authorization"), "body": body})
            if self.fail_with:
                return JSONResponse({"error": "x"}, status_code=self.fail_with.pop(0))
            token = request.headers.get("authorization", "").removeprefix("Bearer ")
            if token not in self.idp.issued_access_tokens:
                return JSONResponse({"error": "invalid_token"}, status_code=401)
            reply = self.replies.pop(0) if self.replies else {"expires_in": 120}
            return JSONResponse({"token": f"dl-{len(self.calls)}", **reply})

        self.served = Served(app)


def broker_for(
    tmp_path: Path,
    idp: AuthorizationServer,
    upstream_url: str | None = None,
    *,
    upstream: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> Broker:
    """A broker with jwt-mode providers ``files`` and ``twin``, and with ``upstream_url`` an
    upstream-mode ``seed`` (``upstream``: more of its delegation settings)."""
    config: dict[str, Any] = {
        "store": f"sqlite:///{tmp_path / 'tb.db'}",
        "encryption_keys": [STORE_KEY],
        "defaults": {"retries": 1, "backoff_seconds": 0.01},
        "providers": {
            "files": {
                **client_credentials(idp),
                "delegation": {
                    "mode": "jwt",
                    "audiences": ["https://files.example"],
                    "max_lifetime_seconds": 120,
                },
            },
            "twin": {  # shares the audience: its tokens must not pass as files'
                **client_credentials(idp),
                "delegation": {"mode": "jwt", "audiences": ["https://files.example"]},
            },
            "other": client_credentials(idp),
        },
        "redirects": {
            "downloads": {
                "provider": "files",
                "audience": "https://files.example",
                "url": "https://files.example/download",
            }
        },
    }
    if upstream_url:
        config["providers"]["seed"] = {
            **client_credentials(idp),
            "delegation": {
                "mode": "upstream",
                "url": upstream_url,
                "audiences": ["downloads"],
                "body": {
                    "tenant": "t1",
                    "user": "{subject}",
                    "object_key": "{object}",
                    "expires_in": "{lifetime}",
                },
                **(upstream or {}),
            },
        }
    if server:
        config["server"] = server
    return Broker(parse_settings(yaml.safe_dump(config), {}))


@pytest.fixture
def api(tmp_path: Path, auth_server: AuthorizationServer) -> Iterator[tuple[Broker, Any]]:
    broker = broker_for(tmp_path, auth_server)
    registry = ConsumerRegistry(
        [
            ("web", hash_key(KEY), [parse_rule("delegate-as:files"), parse_rule("delegate:twin")]),
            ("app", hash_key(APP_KEY), [parse_rule("delegate:files")], "svc-app"),
            ("reader", hash_key(READER_KEY), [parse_rule("files"), parse_rule("twin")]),
        ]
    )
    with broker, Served(create_app(broker, registry)) as client:
        yield broker, client


HEADERS = {"Authorization": f"Bearer {KEY}"}


def public_key(client: Any, token: str) -> Any:
    jwks = client.get("/.well-known/jwks.json").json()
    kid = jwt.get_unverified_header(token)["kid"]
    return next(jwt.PyJWK(k).key for k in jwks["keys"] if k["kid"] == kid)


def test_minted_jwt_is_bound_to_audience_and_object(api: tuple[Broker, Any]) -> None:
    """A delegated JWT verifies with the published JWKS for its audience only, carries the object,
    and lives no longer than the configured maximum."""
    _, client = api
    response = client.post(
        "/v1/delegations",
        json={
            "provider": "files",
            "audience": "https://files.example",
            "object": "a/b.pdf",
            "subject": "user-7",
            "lifetime_seconds": 10_000,
        },
        headers=HEADERS,
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert "refresh_token" not in body
    key = public_key(client, body["token"])
    claims = jwt.decode(body["token"], key, algorithms=["EdDSA"], audience="https://files.example")
    assert claims["obj"] == "a/b.pdf" and claims["sub"] == "user-7"
    assert claims["azp"] == "web" and claims["act"] == {"sub": "web"}
    assert claims["exp"] - claims["iat"] == 120
    assert body["expires_in"] <= 120
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(body["token"], key, algorithms=["EdDSA"], audience="https://other.example")


def test_delegation_refusals_look_like_unknown_providers(api: tuple[Broker, Any]) -> None:
    """Unknown provider, provider without delegation, not allowed, or an unlisted audience: one 404."""
    _, client = api
    answers = [
        client.post("/v1/delegations", json={"provider": p, "audience": a}, headers=HEADERS)
        for p, a in [("nope", "x"), ("other", "x"), ("files", "https://evil.example")]
    ]
    assert {r.status_code for r in answers} == {404}
    assert len({r.content for r in answers}) == 1


def test_signing_keys_survive_restarts(tmp_path: Path, auth_server: AuthorizationServer) -> None:
    """The signing key is stored (encrypted) and reused by a restarted broker: same JWKS."""
    with broker_for(tmp_path, auth_server) as first:
        before = first.jwks()
        token = first.delegate("files", "https://files.example").token
    with broker_for(tmp_path, auth_server) as second:
        assert second.jwks() == before
        assert second._signer("EdDSA").verify(
            token, audience="https://files.example", issuer="tokenbroker/files"
        )
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("tb.db*"))
    assert b"PRIVATE KEY" not in raw


def test_redirect_is_a_no_store_302_with_a_fresh_token(api: tuple[Broker, Any]) -> None:
    """/v1/redirects answers 302 to the upstream with a fresh delegated token and no body."""
    broker, client = api
    first = client.get("/v1/redirects/downloads/reports/q3.pdf", headers=HEADERS)
    second = client.get("/v1/redirects/downloads/reports/q3.pdf", headers=HEADERS)
    assert first.status_code == second.status_code == 302
    assert first.headers["cache-control"] == "no-store"
    assert first.content == b""
    location = urlsplit(first.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == (
        "https://files.example/download/reports/q3.pdf"
    )
    token = parse_qs(location.query)["token"][0]
    claims = broker._signer("EdDSA").verify(
        token, audience="https://files.example", issuer="tokenbroker/files"
    )
    assert claims["obj"] == "reports/q3.pdf"
    assert claims["sub"] == claims["azp"] == claims["act"]["sub"] == "web"
    assert second.headers["location"] != first.headers["location"]


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "a/../../b",
        "a/./b",
        "a%5Cb",
        "%2e%2e/x",
        "a%252e%252e/b",
        "a%00b",
        "a%2F..%2Fb",
        "/etc/passwd",
        "a//b",
    ],
)
def test_redirect_refuses_traversal(api: tuple[Broker, Any], path: str) -> None:
    """Dot segments, backslashes, NUL and (double-)encoded separators get a 404 and no Location;
    sent raw, so no client normalises the path first."""
    import http.client

    _, client = api
    url = urlsplit(str(client.base_url))
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.request("GET", f"/v1/redirects/downloads/{path}", headers=HEADERS)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 404, path
    assert response.getheader("location") is None


def test_upstream_delegation_uses_the_service_token(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """Upstream mode POSTs the filled template with the broker's service token; a 401 makes it
    report that token, fetch a new one and retry once; a 503 maps to provider_unavailable."""
    upstream = DelegationUpstream(auth_server)
    with upstream.served as _:
        url = f"{upstream.served.url}/file-access/download-tokens"
        broker = broker_for(
            tmp_path, auth_server, url.replace("http://127.0.0.1", "http://localhost")
        )
        with broker:
            token = broker.delegate("seed", "downloads", object_="k/1", subject="u1", lifetime=600)
            assert token.token == "dl-1"
            assert upstream.calls[0]["body"] == {
                "tenant": "t1",
                "user": "u1",
                "object_key": "k/1",
                "expires_in": 300,
            }
            assert upstream.calls[0]["auth"] == f"Bearer {broker.get_token('seed').access_token}"
            auth_server.revoke_access_token(broker.get_token("seed").access_token)
            upstream.fail_with = [401]
            assert broker.delegate("seed", "downloads", object_="k/2").token == "dl-3"
            assert auth_server.count("client_credentials") == 2
            upstream.fail_with = [503, 503]
            with pytest.raises(DelegationFailedError):
                broker.delegate("seed", "downloads")
            with pytest.raises(UnknownProviderError):
                broker.delegate("seed", "elsewhere")


def test_rotate_keys_reencrypts_signing_keys(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """After rotate-key, the delegation signing key opens with the new key alone (same JWKS)."""
    from tokenbroker import Secret
    from tokenbroker.core.crypto import Keyring
    from tokenbroker.store import open_store

    with broker_for(tmp_path, auth_server) as broker:
        before = broker.jwks()
        broker.get_token("files")
    new = generate_key()
    both = open_store(f"sqlite:///{tmp_path / 'tb.db'}", Keyring([Secret(new), Secret(STORE_KEY)]))
    try:
        assert both.rotate_keys() >= 2  # the access token and the signing key
    finally:
        both.close()
    only_new = open_store(f"sqlite:///{tmp_path / 'tb.db'}", Keyring([Secret(new)]))
    try:
        assert [kid for kid, _ in only_new.signing_keys("EdDSA")] == [before["keys"][0]["kid"]]
    finally:
        only_new.close()


def delegate(client: Any, key: str, **body: Any) -> Any:
    """POST /v1/delegations for ``files`` (unless ``body`` names another provider)."""
    return client.post(
        "/v1/delegations",
        json={"provider": "files", "audience": AUDIENCE, **body},
        headers={"Authorization": f"Bearer {key}"},
    )


def test_token_rules_do_not_allow_delegation(api: tuple[Broker, Any]) -> None:
    """A consumer with token rules but no delegate: rule gets, for delegations and redirects,
    the byte-identical 404 of an unknown provider."""
    _, client = api
    unknown = delegate(client, READER_KEY, provider="nope")
    answers = [
        delegate(client, READER_KEY),
        delegate(client, READER_KEY, provider="twin"),
        delegate(client, READER_KEY, subject="admin", object="../../etc/passwd"),
    ]
    assert unknown.status_code == 404
    assert [(r.status_code, r.content) for r in answers] == [(404, unknown.content)] * 3
    hop = client.get(
        "/v1/redirects/downloads/a.pdf", headers={"Authorization": f"Bearer {READER_KEY}"}
    )
    assert (hop.status_code, hop.content) == (404, unknown.content)
    assert "location" not in hop.headers


def test_subject_is_the_consumers_own_unless_delegate_as(api: tuple[Broker, Any]) -> None:
    """Without a subject the token's sub is the consumer's configured one; naming another
    needs delegate-as: (else 403 forbidden_subject, no token); naming its own is fine."""
    _, client = api
    own = delegate(client, APP_KEY)
    assert own.status_code == 200
    claims = jwt.decode(own.json()["token"], options={"verify_signature": False})
    assert claims["sub"] == "svc-app" and claims["azp"] == "app"
    assert claims["act"] == {"sub": "app"}
    refused = delegate(client, APP_KEY, subject="admin")
    assert refused.status_code == 403
    assert refused.json() == {
        "error": {
            "code": "forbidden_subject",
            "message": "this consumer may delegate only for its own subject",
        }
    }
    assert delegate(client, APP_KEY, subject="svc-app").status_code == 200
    other = delegate(client, KEY, subject="admin")  # web has delegate-as:files
    assert jwt.decode(other.json()["token"], options={"verify_signature": False})["sub"] == "admin"
    plain = delegate(client, KEY, provider="twin", subject="admin")  # only delegate:twin
    assert plain.status_code == 403


@pytest.mark.parametrize(
    "obj",
    ["../../etc/passwd", "/etc/passwd", "a/../b", "a/./b", "a\\b", "%2e%2e/x", "a//b", "a\nb", ""],
)
def test_object_must_be_a_safe_relative_path(api: tuple[Broker, Any], obj: str) -> None:
    """An object that is not a safe relative path (the redirect path rules) gets 400
    invalid_delegation and no token, whatever the consumer may do."""
    _, client = api
    answer = delegate(client, KEY, object=obj)
    assert answer.status_code == 400, obj
    assert answer.json()["error"]["code"] == "invalid_delegation"
    assert "token" not in answer.json()


@pytest.mark.parametrize("subject", ["a b", "a\nb", "", "x" * 257, "ü"])
def test_a_malformed_subject_is_refused(api: tuple[Broker, Any], subject: str) -> None:
    """A subject that is not 1-256 visible ASCII characters gets 400 invalid_delegation."""
    _, client = api
    answer = delegate(client, KEY, subject=subject)
    assert answer.status_code == 400, subject
    assert answer.json()["error"]["code"] in {"invalid_delegation", "invalid_request"}


def test_a_token_minted_for_one_provider_does_not_verify_for_another(
    api: tuple[Broker, Any],
) -> None:
    """Two providers delegate to the same audience: with the published JWKS, each token
    verifies for its own provider's issuer and fails for the other's."""
    _, client = api
    files = delegate(client, KEY).json()["token"]
    twin = delegate(client, KEY, provider="twin").json()["token"]
    for token, own, other in ((files, "files", "twin"), (twin, "twin", "files")):
        key = public_key(client, token)
        claims = jwt.decode(
            token, key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=f"tokenbroker/{own}"
        )
        assert claims["iss"] == f"tokenbroker/{own}"
        with pytest.raises(jwt.InvalidIssuerError):
            jwt.decode(
                token, key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=f"tokenbroker/{other}"
            )


def test_audit_line_names_consumer_subject_object_and_jti_never_the_token(
    api: tuple[Broker, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Each delegation and redirect has an audit line with consumer, provider, audience,
    subject, object and jti (refusals with their code); no tokenbroker log record holds a
    token."""
    _, client = api
    caplog.set_level(logging.DEBUG, logger="tokenbroker")
    minted = delegate(client, KEY, subject="user-7", object="a/b.pdf").json()["token"]
    delegate(client, APP_KEY, subject="admin")
    hop = client.get("/v1/redirects/downloads/r/q.pdf", headers=HEADERS)
    hopped = parse_qs(urlsplit(hop.headers["location"]).query)["token"][0]
    unverified = {"verify_signature": False}
    jti = jwt.decode(minted, options=unverified)["jti"]
    hop_jti = jwt.decode(hopped, options=unverified)["jti"]
    audits = [r.getMessage() for r in caplog.records if r.name == "tokenbroker.audit"]
    assert (
        f"delegation consumer=web provider=files audience={AUDIENCE} subject=user-7"
        f" object=a/b.pdf jti={jti} outcome=ok"
    ) in audits
    assert (
        f"delegation consumer=app provider=files audience={AUDIENCE} subject=admin"
        " object=None outcome=forbidden_subject"
    ) in audits
    assert (
        f"redirect consumer=web route=downloads provider=files audience={AUDIENCE}"
        f" subject=web object=r/q.pdf jti={hop_jti} outcome=ok"
    ) in audits
    everything = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("tokenb"))
    assert minted not in everything and hopped not in everything
    assert minted.split(".")[2] not in everything and hopped.split(".")[2] not in everything


def test_delegation_rules_and_subjects_against_a_real_serve(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """The reported request against a real `serve`: a consumer allowed only token reads of
    the provider gets 404 for `subject: admin, object: ../../etc/passwd`; one added (while it
    runs) with `consumers add --allow delegate:files --subject alice` gets 400 for that object,
    403 for that subject, and a token naming alice as sub and itself as azp and act.sub."""
    port = free_port()
    config = tmp_path / "tokenbroker.yaml"
    settings = {
        "store": f"sqlite:///{tmp_path / 'tb.db'}",
        "encryption_keys": [STORE_KEY],
        "providers": {
            "files": {
                **client_credentials(auth_server),
                "delegation": {"mode": "jwt", "audiences": [AUDIENCE]},
            }
        },
        "consumers": {"reader": {"api_key_sha256": hash_key(READER_KEY), "allow": ["files"]}},
        "server": {"listen": f"127.0.0.1:{port}"},
        "telemetry": {"log_level": "warning"},
    }
    config.write_text(yaml.safe_dump(settings))
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    attack = {"subject": "admin", "object": "../../etc/passwd"}
    try:
        wait_for(lambda: http_status(url + "/livez") == 200, "serve to listen", timeout=30)
        with httpx.Client(base_url=url, timeout=10) as client:
            refused = delegate(client, READER_KEY, **attack)
            unknown = delegate(client, READER_KEY, provider="nope")
            assert (refused.status_code, refused.content) == (404, unknown.content)
            added = subprocess.run(  # noqa: S603
                [sys.executable, "-m", "tokenbroker.cli", "consumers", "add", "portal"]
                + ["--allow", "delegate:files", "--subject", "alice", "--config", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            portal = added.stdout.splitlines()[-1]
            # serve follows the store's consumers every 0.5 s; poll as slowly, for each refused
            # poll spends one of the address's 10 failed-key checks a minute
            deadline = time.monotonic() + 4.5
            while (status := delegate(client, portal, **attack).status_code) == 401:
                assert time.monotonic() < deadline, "serve did not accept the new consumer"
                time.sleep(0.5)
            assert status == 400
            assert delegate(client, portal, subject="admin").status_code == 403
            answer = delegate(client, portal, object="reports/q3.pdf")
            assert answer.status_code == 200
            token = answer.json()["token"]
            jwks = client.get("/.well-known/jwks.json").json()
    finally:
        err = terminate(process)
    assert process.returncode == 0, err
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k).key for k in jwks["keys"] if k["kid"] == kid)
    claims = jwt.decode(
        token, key, algorithms=["EdDSA"], audience=AUDIENCE, issuer="tokenbroker/files"
    )
    assert claims["sub"] == "alice" and claims["obj"] == "reports/q3.pdf"
    assert claims["azp"] == "portal" and claims["act"] == {"sub": "portal"}


def test_minted_times_follow_the_injected_clock(tmp_path: Path) -> None:
    """A minted token's ``iat``/``nbf``/``exp`` and ``expires_at`` are the injected clock's wall
    time, and a parent's remaining life is measured on the same clock."""
    from tokenbroker.core.clock import ManualClock
    from tokenbroker.core.crypto import Keyring
    from tokenbroker.core.secret import Secret
    from tokenbroker.engine.delegation import Signer, bound_lifetime
    from tokenbroker.store.memory import MemoryStore

    clock = ManualClock()
    clock.advance(5)
    signer = Signer(MemoryStore(Keyring([Secret(generate_key())])), clock=clock)
    minted = signer.sign(
        issuer="https://tb/p",
        provider="p",
        audience="files",
        lifetime=120,
        subject=None,
        object_=None,
    )
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    now = int(clock.time())
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (now, now, now + 120)
    assert minted.expires_at == now + 120
    assert minted.seconds_left(clock) == 120
    clock.advance(100)
    assert minted.seconds_left(clock) == 20
    assert bound_lifetime(300, 600, clock.time() + 42, clock=clock) == 42


def test_a_broker_mints_on_its_injected_clock(make_broker: BrokerFactory) -> None:
    """A broker given a clock signs delegated tokens on it (``iat``/``exp`` are the clock's time,
    not the system's), so delegation tests need no sleeping."""
    from tokenbroker.core.clock import ManualClock

    clock = ManualClock()
    clock.advance(1000)
    broker = make_broker(
        {
            "files": {
                "grant": "client_credentials",
                "token_url": "http://127.0.0.1:9/token",
                "client_id": "c",
                "client_secret": "s",
                "delegation": {"mode": "jwt", "audiences": ["https://files.example"]},
            }
        },
        clock=clock,
    )
    minted = broker.delegate("files", "https://files.example", lifetime=60)
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    assert (claims["iat"], claims["exp"]) == (int(clock.time()), int(clock.time()) + 60)


@pytest.fixture
def upstream(auth_server: AuthorizationServer) -> Iterator[DelegationUpstream]:
    """A delegation endpoint on 127.0.0.1 that accepts the auth server's live tokens."""
    served = DelegationUpstream(auth_server)
    with served.served:
        yield served


def upstream_url(upstream: DelegationUpstream) -> str:
    # https is required but for loopback; "localhost" is loopback by name.
    return f"{upstream.served.url}/file-access/download-tokens".replace(
        "http://127.0.0.1", "http://localhost"
    )


def test_upstream_template_keeps_json_types(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: DelegationUpstream
) -> None:
    """A template string that is one placeholder is sent with its value's JSON type (the
    lifetime a number, an absent object or subject null); the template's own numbers,
    booleans and nulls stay as they are; placeholders inside text are replaced as text."""
    template = {
        "expires_in": "{lifetime}",
        "object_key": "{object}",
        "user": "{subject}",
        "inline": True,
        "watermark": False,
        "note": None,
        "max_downloads": 3,
        "ratio": 0.5,
        "label": "{consumer} for {subject}: {lifetime}s",
        "keys": ["{object}", "{audience}"],
    }
    with broker_for(
        tmp_path, auth_server, upstream_url(upstream), upstream={"body": template}
    ) as broker:
        broker.delegate("seed", "downloads", lifetime=90, actor="web")
        broker.delegate("seed", "downloads", object_="k/1", subject="u1", lifetime=60)
    assert upstream.calls[0]["body"] == {
        "expires_in": 90,
        "object_key": None,
        "user": None,
        "inline": True,
        "watermark": False,
        "note": None,
        "max_downloads": 3,
        "ratio": 0.5,
        "label": "web for : 90s",
        "keys": [None, "downloads"],
    }
    second = upstream.calls[1]["body"]
    assert (second["expires_in"], second["object_key"], second["user"]) == (60, "k/1", "u1")
    assert type(second["expires_in"]) is int


def test_upstream_reply_expires_at_is_understood(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: DelegationUpstream
) -> None:
    """An ISO-8601 ``expires_at`` (with Z, with an offset, or without one: UTC) at
    ``expires_at_path`` sets the token's expiry when it is sooner than the lifetime asked for;
    ``expires_in`` is still honoured beside it."""
    from datetime import UTC, datetime, timedelta, timezone

    now = datetime.now(UTC)
    in_90 = (now + timedelta(seconds=90)).replace(microsecond=0)
    upstream.replies = [
        {"grant": {"expires_at": in_90.strftime("%Y-%m-%dT%H:%M:%SZ")}},
        {"grant": {"expires_at": in_90.astimezone(timezone(timedelta(hours=8))).isoformat()}},
        {"grant": {"expires_at": in_90.replace(tzinfo=None).isoformat()}},
        {"grant": {"expires_at": (now + timedelta(hours=1)).isoformat()}, "expires_in": 45},
    ]
    settings = {"expires_at_path": "grant.expires_at", "max_lifetime_seconds": 300}
    with broker_for(tmp_path, auth_server, upstream_url(upstream), upstream=settings) as broker:
        tokens = [broker.delegate("seed", "downloads", lifetime=300) for _ in range(4)]
    for token in tokens[:3]:
        assert token.expires_at == pytest.approx(in_90.timestamp(), abs=0.01)
    assert tokens[3].expires_at == pytest.approx(time.time() + 45, abs=5)


@pytest.mark.parametrize(
    "reply",
    [
        {"expires_in": 0},
        {"expires_in": -30},
        {"expires_at": "2001-01-01T00:00:00Z"},
        {"expires_at": "PAST"},  # replaced by a time a minute ago
    ],
    ids=["expires_in-0", "expires_in-negative", "expires_at-2001", "expires_at-a-minute-ago"],
)
def test_an_already_expired_reply_is_provider_unavailable(
    tmp_path: Path,
    auth_server: AuthorizationServer,
    upstream: DelegationUpstream,
    reply: dict[str, Any],
) -> None:
    """A reply with ``expires_in`` ≤ 0 or an ``expires_at`` in the past is the provider's error
    (ProviderUnavailableError, not the endpoint's delegation_failed), never a 1-second token."""
    from datetime import UTC, datetime

    if reply.get("expires_at") == "PAST":
        reply = {"expires_at": datetime.fromtimestamp(time.time() - 60, UTC).isoformat()}
    upstream.replies = [reply] * 4
    settings = {"expires_at_path": "expires_at"}
    broker = broker_for(tmp_path, auth_server, upstream_url(upstream), upstream=settings)
    with broker, pytest.raises(ProviderUnavailableError) as caught:
        broker.delegate("seed", "downloads")
    assert type(caught.value) is ProviderUnavailableError
    assert "expired" in str(caught.value)
    assert "dl-" not in str(caught.value)


def consumer_api(broker: Broker) -> Served:
    """The HTTP API for ``broker`` with the web/app/reader consumers, served on 127.0.0.1."""
    registry = ConsumerRegistry(
        [
            (
                "web",
                hash_key(KEY),
                [parse_rule("delegate-as:files"), parse_rule("delegate-as:seed")],
            ),
            ("app", hash_key(APP_KEY), [parse_rule("delegate:files")], "svc-app"),
            ("reader", hash_key(READER_KEY), [parse_rule("files")]),
        ]
    )
    return Served(create_app(broker, registry))


def test_delegation_failed_and_provider_unavailable_are_told_apart(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: DelegationUpstream
) -> None:
    """Over HTTP: the delegation endpoint failing after retries is 502 delegation_failed; the
    broker's service token unavailable (the IdP down) is 503 provider_unavailable with
    Retry-After, and the endpoint is then never asked; an expired reply is 503 too."""
    from tokenbroker.testing import Fault

    broker = broker_for(tmp_path, auth_server, upstream_url(upstream))
    with broker, consumer_api(broker) as client:
        upstream.fail_with = [500, 500]
        failed = delegate(client, KEY, provider="seed", audience="downloads")
        assert failed.status_code == 502
        assert failed.json() == {
            "error": {
                "code": "delegation_failed",
                "message": "the provider's delegation endpoint failed; retry later",
            }
        }
        asked = len(upstream.calls)
        broker.invalidate("seed", broker.get_token("seed").access_token)
        auth_server.inject(Fault(status=503, body='{"error": "temporarily_unavailable"}'), times=2)
        down = delegate(client, KEY, provider="seed", audience="downloads")
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "provider_unavailable"
        assert "retry-after" in down.headers
        assert len(upstream.calls) == asked
        upstream.replies = [{"expires_in": 0}] * 2
        expired = delegate(client, KEY, provider="seed", audience="downloads")
        assert (expired.status_code, expired.json()["error"]["code"]) == (
            503,
            "provider_unavailable",
        )
        assert "dl-" not in expired.text


def test_a_delegation_scope_is_fetched_with_the_providers_client(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: DelegationUpstream
) -> None:
    """``delegation.scope`` gets the service token for the endpoint from the same provider and
    client, with that scope, cached apart from the provider's ordinary tokens (one token
    request for two delegations) and never served as them."""
    auth_server.add_client(CLIENT_ID, CLIENT_SECRET, scopes=["read", "files:download.delegate"])
    settings = {"scope": "files:download.delegate"}
    with broker_for(tmp_path, auth_server, upstream_url(upstream), upstream=settings) as broker:
        ordinary = broker.get_token("seed")
        broker.delegate("seed", "downloads", object_="a.pdf")
        broker.delegate("seed", "downloads", object_="b.pdf")
        scopes = sorted(r.form["scope"] for r in auth_server.requests if r.grant)
        assert scopes == ["files:download.delegate", "read"]
        delegation_token = upstream.calls[0]["auth"].removeprefix("Bearer ")
        assert upstream.calls[1]["auth"] == upstream.calls[0]["auth"]
        assert delegation_token != ordinary.access_token
        assert broker.get_token("seed").access_token == ordinary.access_token
        assert broker.get_token("seed", "files:download.delegate").access_token == delegation_token


def sub_of(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    claims = jwt.decode(answer.json()["token"], options={"verify_signature": False})
    return str(claims["sub"])


def test_forwarded_user_from_a_trusted_proxy_is_the_subject(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """With the peer in server.trusted_proxies, X-Forwarded-User names the subject (even when
    the proxy also sends X-Forwarded-For, which rewrites the client address) for a consumer
    with delegate-as, in delegations and redirects; the body's subject wins; a consumer with
    only delegate: gets 403 for another user and its own subject for its own."""
    broker = broker_for(tmp_path, auth_server, server={"trusted_proxies": ["127.0.0.0/8"]})
    front = {"X-Forwarded-User": "alice", "X-Forwarded-For": "203.0.113.7"}
    with broker, consumer_api(broker) as client:
        assert sub_of(delegate(client, KEY)) == "web"
        assert sub_of(post(client, KEY, front)) == "alice"
        assert sub_of(post(client, KEY, {"X-Forwarded-User": "bob"})) == "bob"
        assert sub_of(post(client, KEY, front, subject="carol")) == "carol"
        refused = post(client, APP_KEY, front)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "forbidden_subject"
        assert sub_of(post(client, APP_KEY, {"X-Forwarded-User": "svc-app"})) == "svc-app"
        hop = client.get(
            "/v1/redirects/downloads/r/q.pdf", headers={"Authorization": f"Bearer {KEY}", **front}
        )
        assert hop.status_code == 302
        hopped = parse_qs(urlsplit(hop.headers["location"]).query)["token"][0]
        assert jwt.decode(hopped, options={"verify_signature": False})["sub"] == "alice"


def test_forwarded_user_from_any_other_peer_is_ignored(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """Without trusted_proxies, or from a peer outside them (even one whose X-Forwarded-For
    names a trusted address), X-Forwarded-User is ignored: the subject is the consumer's own."""
    forged = {"X-Forwarded-User": "alice", "X-Forwarded-For": "10.1.2.3"}
    for index, server in enumerate([None, {"trusted_proxies": ["10.0.0.0/8"]}]):
        (tmp_path / str(index)).mkdir()
        broker = broker_for(tmp_path / str(index), auth_server, server=server)
        with broker, consumer_api(broker) as client:
            assert sub_of(post(client, KEY, forged)) == "web"
            assert sub_of(post(client, APP_KEY, forged)) == "svc-app"
            hop = client.get(
                "/v1/redirects/downloads/x.pdf",
                headers={"Authorization": f"Bearer {KEY}", **forged},
            )
            hopped = parse_qs(urlsplit(hop.headers["location"]).query)["token"][0]
            assert jwt.decode(hopped, options={"verify_signature": False})["sub"] == "web"


def post(client: Any, key: str, headers: dict[str, str], **body: Any) -> Any:
    """POST /v1/delegations for ``files`` with extra request headers."""
    return client.post(
        "/v1/delegations",
        json={"provider": "files", "audience": AUDIENCE, **body},
        headers={"Authorization": f"Bearer {key}", **headers},
    )
