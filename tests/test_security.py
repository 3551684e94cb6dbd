"""Canary secrets never reach a log record (at DEBUG), an exception's text or traceback, or a repr."""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tokenbroker import Broker, ManualClock, TokenBrokerError, parse_settings
from tokenbroker.core.crypto import generate_key
from tokenbroker.core.events import Event
from tokenbroker.testing import AuthorizationServer, Fault


class Capture(logging.Handler):
    """Formats every record, with its exception, the way a real handler would."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # authlib's loggers belong to the test identity provider, which logs what it issues.
        if not record.name.startswith("authlib"):
            self.lines.append(self.format(record))


@pytest.fixture
def capture() -> object:
    handler = Capture()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)


def test_canaries_appear_in_no_log_exception_repr_or_store_file(
    capture: Capture, tmp_path: Path
) -> None:
    """A scripted session with faults leaks no client secret, password, key, refresh or access
    token into logs, exceptions, reprs, or the raw bytes of the SQLite file and its WAL."""
    tag = uuid.uuid4().hex
    client_secret = f"CANARY_CS_{tag}"
    password = f"CANARY_PW_{tag}"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    server = AuthorizationServer(expires_in=3600)
    server.add_client("cc", client_secret, scopes=["read"])
    server.add_client("jwt", None, auth_method="private_key_jwt", public_key=public)
    server.add_client("rt", None, auth_method="none")
    server.add_account("alice", password)
    seen: list[Event] = []
    texts: list[str] = []
    with server:
        seed = server.issue_refresh_token("rt")
        config = {
            "store": f"sqlite:///{tmp_path / 'tb.db'}",
            "encryption_keys": [generate_key()],
            "defaults": {"retries": 1, "backoff_seconds": 0.01},
            "providers": {
                "cc": {
                    "grant": "client_credentials",
                    "token_url": server.token_url,
                    "client_id": "cc",
                    "client_secret": client_secret,
                },
                "jwt": {
                    "grant": "client_credentials",
                    "token_url": server.token_url,
                    "client_id": "jwt",
                    "client_auth": "private_key_jwt",
                    "private_key": pem,
                },
                "rt": {
                    "grant": "refresh_token",
                    "token_url": server.token_url,
                    "client_id": "rt",
                    "refresh_token": seed,
                },
                "db": {
                    "grant": "login",
                    "login_url": server.login_url,
                    "token_path": "data.token",
                    "credentials": [{"username": "alice", "password": password}],
                },
            },
        }
        settings = parse_settings(yaml.safe_dump(config), {})
        clock = ManualClock()
        with Broker(settings, clock=clock) as broker:
            broker.subscribe(seen.append)
            tokens = [broker.get_token(p) for p in ("cc", "jwt", "rt", "db")]
            tokens.append(asyncio.run(broker.aget_token("rt", None)))
            with httpx.Client(auth=broker.httpx_auth("cc")) as client:
                server.revoke_access_token(tokens[0].access_token)
                client.get(server.resource_url)
            clock.advance(4000)
            broker.get_token("rt")
            clock.advance(4000)
            faults = [
                Fault(
                    status=400, body=f'{{"error":"invalid_request","error_description":"{seed}"}}'
                ),
                Fault(status=200, body=f'{{"access_token":"{client_secret}\\r\\nX: 1"}}'),
                Fault(status=200, body=f"<html>{password}</html>"),
                Fault(status=500, body=f'{{"error":"{seed}"}}'),
                Fault(status=401, body=f'{{"error":"invalid_client","error_description":"{pem}"}}'),
            ]
            for fault in faults:
                server.inject(fault, times=2)
                try:
                    broker.get_token("cc", scope="write")
                except TokenBrokerError as exc:
                    texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
                broker._cache.reset(("cc", "write", None))
            texts += [repr(broker), repr(settings), repr(tokens), str(tokens), repr(seen)]
            texts += [repr(broker.states()), repr(settings.providers), str(settings.model_dump())]
            texts.append(settings.model_dump_json())
            raw_files = b"".join(
                p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("tb.db")
            )
        secrets = [client_secret, password, seed, pem.splitlines()[1]]
        secrets += server.issued_access_tokens + server.issued_login_tokens
        secrets += server.presented_refresh_tokens
    assert len(raw_files) > 4096
    on_disk = [s[:12] for s in secrets if s and s.encode() in raw_files]
    assert on_disk == []
    assert len(texts) > 10
    assert len(capture.lines) > 10
    haystack = "\n".join(texts + capture.lines)
    leaked = [s[:12] for s in secrets if s and s in haystack]
    assert leaked == []


def test_http_session_leaks_no_secret_into_logs_metrics_or_bodies(
    capture: Capture, tmp_path: Path
) -> None:
    """A scripted HTTP session (token reads, invalidations, provider faults, delegations,
    redirects, bad keys) at DEBUG: client secret, password, refresh tokens, the consumer key
    and the store key appear in no log line, no metric and no response; access tokens appear
    only in the token responses that hand them out."""
    from support import Served
    from tokenbroker.api.app import create_app
    from tokenbroker.core.rules import parse_rule
    from tokenbroker.engine.consumers import ConsumerRegistry, hash_key, new_key

    tag = uuid.uuid4().hex
    client_secret, password = f"CANARY_CS_{tag}", f"CANARY_PW_{tag}"
    store_key, api_key = generate_key(), new_key()
    server = AuthorizationServer(expires_in=3600)
    server.add_client("cc", client_secret, scopes=["read"])
    server.add_client("rt", None, auth_method="none")
    server.add_account("alice", password)
    with server:
        seed = server.issue_refresh_token("rt")
        config = {
            "store": f"sqlite:///{tmp_path / 'tb.db'}",
            "encryption_keys": [store_key],
            "defaults": {"retries": 0},
            "providers": {
                "cc": {
                    "grant": "client_credentials",
                    "token_url": server.token_url,
                    "client_id": "cc",
                    "client_secret": client_secret,
                    "scopes": ["read"],
                    "delegation": {"mode": "jwt", "audiences": ["files"]},
                },
                "rt": {
                    "grant": "refresh_token",
                    "token_url": server.token_url,
                    "client_id": "rt",
                    "refresh_token": seed,
                },
                "db": {
                    "grant": "login",
                    "login_url": server.login_url,
                    "token_path": "data.token",
                    "credentials": [{"username": "alice", "password": password}],
                },
            },
            "redirects": {
                "dl": {"provider": "cc", "audience": "files", "url": "https://files.example/d"}
            },
        }
        registry = ConsumerRegistry(
            [("app", hash_key(api_key), [parse_rule(p) for p in ("cc", "rt", "db", "delegate:cc")])]
        )
        bodies: list[str] = []
        token_bodies: list[str] = []
        key = {"Authorization": f"Bearer {api_key}"}
        with (
            Broker(parse_settings(yaml.safe_dump(config), {})) as broker,
            Served(create_app(broker, registry)) as client,
        ):
            for provider in ("cc", "rt", "db"):
                token_bodies.append(client.get(f"/v1/tokens/{provider}", headers=key).text)
            rejected = client.get("/v1/tokens/cc", headers=key).json()["access_token"]
            token_bodies.append(
                client.post(
                    "/v1/tokens/cc/invalidate", json={"access_token": rejected}, headers=key
                ).text
            )
            server.inject(Fault(status=500, body=f'{{"error":"{seed}"}}'), times=3)
            broker.invalidate("rt", broker.get_token("rt").access_token)
            bodies.append(client.get("/v1/tokens/rt", headers=key).text)
            bodies.append(
                client.post(
                    "/v1/delegations", json={"provider": "cc", "audience": "files"}, headers=key
                ).text
            )
            hop = client.get("/v1/redirects/dl/a.txt", headers=key)
            bodies += [hop.text, str(dict(hop.headers))]
            bodies.append(client.get("/v1/providers", headers=key).text)
            bodies.append(
                client.get("/v1/tokens/cc", headers={"Authorization": "Bearer tbk_x"}).text
            )
            bodies += [
                client.get(p).text for p in ("/health", "/readyz", "/metrics", "/openapi.json")
            ]
        refresh_tokens = server.presented_refresh_tokens + [seed]
        access_tokens = server.issued_access_tokens + server.issued_login_tokens
    never = [client_secret, password, store_key, api_key, *refresh_tokens]
    everywhere = "\n".join(capture.lines + bodies + token_bodies)
    assert [s[:12] for s in never if s in everywhere] == []
    outside_token_bodies = "\n".join(capture.lines + bodies)
    assert [t[:8] for t in access_tokens if t in outside_token_bodies] == []
    assert any(t in "".join(token_bodies) for t in access_tokens)
    assert len(capture.lines) > 20
