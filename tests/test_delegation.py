"""Delegated tokens: minted JWTs bound to audience and object, upstream delegation, 302 redirects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from support import Served, client_credentials
from tokenbroker import Broker, UnknownProviderError, parse_settings
from tokenbroker.app import create_app
from tokenbroker.consumers import ConsumerRegistry, hash_key, new_key, parse_rule
from tokenbroker.crypto import generate_key
from tokenbroker.testing import AuthorizationServer

KEY = new_key()
STORE_KEY = generate_key()


class DelegationUpstream:
    """A delegation endpoint that accepts only live tokens of the test IdP and can fail on cue."""

    def __init__(self, idp: AuthorizationServer) -> None:
        self.idp = idp
        self.calls: list[dict[str, Any]] = []
        self.fail_with: list[int] = []
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
            return JSONResponse({"token": f"dl-{len(self.calls)}", "expires_in": 120})

        self.served = Served(app)


def broker_for(tmp_path: Path, idp: AuthorizationServer, upstream_url: str | None = None) -> Broker:
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
            },
        }
    return Broker(parse_settings(yaml.safe_dump(config), {}))


@pytest.fixture
def api(tmp_path: Path, auth_server: AuthorizationServer) -> Iterator[tuple[Broker, Any]]:
    broker = broker_for(tmp_path, auth_server)
    registry = ConsumerRegistry([("web", hash_key(KEY), [parse_rule("files"), parse_rule("seed")])])
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
    assert claims["obj"] == "a/b.pdf" and claims["sub"] == "user-7" and claims["azp"] == "files"
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
            token, audience="https://files.example", issuer="tokenbroker"
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
        token, audience="https://files.example", issuer="tokenbroker"
    )
    assert claims["obj"] == "reports/q3.pdf"
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
                "expires_in": "300",
            }
            assert upstream.calls[0]["auth"] == f"Bearer {broker.get_token('seed').access_token}"
            auth_server.revoke_access_token(broker.get_token("seed").access_token)
            upstream.fail_with = [401]
            assert broker.delegate("seed", "downloads", object_="k/2").token == "dl-3"
            assert auth_server.count("client_credentials") == 2
            upstream.fail_with = [503, 503]
            from tokenbroker import ProviderUnavailableError

            with pytest.raises(ProviderUnavailableError):
                broker.delegate("seed", "downloads")
            with pytest.raises(UnknownProviderError):
                broker.delegate("seed", "elsewhere")


def test_rotate_keys_reencrypts_signing_keys(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """After rotate-key, the delegation signing key opens with the new key alone (same JWKS)."""
    from tokenbroker import Secret
    from tokenbroker.crypto import Keyring
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
