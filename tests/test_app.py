"""The HTTP API: keys on every route but the probes, identical 404s, no-store tokens, the error table."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from conftest import BrokerFactory
from support import Served, client_credentials, login, refresh_token, stampede
from tokenbroker import Broker
from tokenbroker.api.access import PUBLIC_PATHS, STATE_PATHS
from tokenbroker.api.app import create_app
from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.rules import parse_rule
from tokenbroker.core.secret import Secret
from tokenbroker.edge.ratelimit import RateLimits
from tokenbroker.engine.consumers import ConsumerRegistry, hash_key, new_key
from tokenbroker.store import open_store
from tokenbroker.testing import AuthorizationServer, Fault
from tokenbroker.testing.asgi import ServedApp

KEY = new_key()
OTHER_KEY = new_key()


@pytest.fixture
def served(broker: Broker) -> Iterator[Served]:
    registry = ConsumerRegistry(
        [
            ("etl", hash_key(KEY), [parse_rule("svc:read"), parse_rule("rt")]),
            ("other", hash_key(OTHER_KEY), [parse_rule("secret-svc")]),
        ]
    )
    limits = RateLimits(auth_failures="1000/minute")
    served = Served(create_app(broker, registry, limits=limits, openapi=True))
    with served:
        yield served


@pytest.fixture
def broker(auth_server: AuthorizationServer, make_broker: BrokerFactory) -> Broker:
    seed = auth_server.issue_refresh_token("rt-client")
    return make_broker(
        {
            "svc": client_credentials(auth_server, required=True),
            "secret-svc": client_credentials(auth_server),
            "rt": refresh_token(auth_server, seed),
        },
        sections={"compat": {"get_token": {"provider": "svc"}}},  # enumerated below too
    )


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_the_probes_needs_a_key(served: Served, broker: Broker) -> None:
    """Each route of the app (the OpenAPI document included, when served) answers 401 +
    WWW-Authenticate without a key; probes answer without; the status page's routes (/ui)
    answer the login form, a redirect to it, or 403; the OAuth callback, whose state is its
    credential, refuses a request without one (400)."""
    client = served.client
    routes = [r for r in served.app.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 8
    assert {"/openapi.json", "/get-token"} <= {r.path for r in routes}
    for route in routes:
        path = re.sub(r"\{[^}]+\}", "svc", route.path)
        for method in route.methods:
            response = client.request(method, path)
            if route.path in PUBLIC_PATHS:
                assert response.status_code in (200, 503), route.path
                continue
            if route.path.startswith("/ui"):
                # The status page works on a session: its login form and static files are
                # public, the rest redirects to the form or answers 403 (tests/test_console.py).
                assert response.status_code in (200, 303, 403, 404), (method, route.path)
                continue
            if route.path in STATE_PATHS:  # the single-use state is the credential
                assert response.status_code == 400, route.path
                assert "Authorization" not in response.text
                continue
            assert response.status_code == 401, (method, route.path)
            assert response.headers["www-authenticate"] == 'Bearer realm="tokenbroker"'
            body = response.json()
            if route.path == "/get-token":  # the Tesla token owner's shape (compat.get_token)
                assert body["status"] == "error"
                body = {"error": body}
            assert body["error"]["code"] == "unauthorized"
            wrong = client.request(method, path, headers=auth("tbk_" + "x" * 43))
            assert wrong.status_code == 401
            assert 'error="invalid_token"' in wrong.headers["www-authenticate"]


def test_unknown_and_forbidden_providers_get_identical_404s(served: Served, broker: Broker) -> None:
    """A provider that does not exist and one the consumer may not use look exactly the same,
    and their words are true of both (a forbidden provider does exist)."""
    client = served.client
    unknown = client.get("/v1/tokens/nope", headers=auth())
    assert unknown.json()["error"] == {
        "code": "not_found",
        "message": "no such provider or scope for this key",
    }
    forbidden = client.get("/v1/tokens/secret-svc", headers=auth())
    wrong_scope = client.get("/v1/tokens/svc", params={"scope": "write"}, headers=auth())
    for response in (forbidden, wrong_scope):
        assert response.status_code == unknown.status_code == 404
        assert response.content == unknown.content
        strip = {"date", "x-request-id"}
        assert {k: v for k, v in response.headers.items() if k not in strip} == {
            k: v for k, v in unknown.headers.items() if k not in strip
        }


def test_token_read_is_no_store_and_has_no_refresh_token(
    served: Served, broker: Broker, auth_server: AuthorizationServer
) -> None:
    """GET /v1/tokens/{p} returns the broker's token with no-store headers and no refresh token."""
    client = served.client
    for provider in ("svc", "rt"):
        response = client.get(f"/v1/tokens/{provider}", headers=auth())
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["pragma"] == "no-cache"
        body = response.json()
        assert set(body) == {"access_token", "token_type", "expires_at", "expires_in", "scope"}
        assert body["access_token"] == broker.get_token(provider).access_token
        assert 0 < body["expires_in"] <= 3600
    for rt in auth_server.presented_refresh_tokens + [auth_server.issue_refresh_token("rt-client")]:
        assert rt not in response.text


def test_invalidate_from_fifty_consumers_refreshes_once(
    served: Served, broker: Broker, auth_server: AuthorizationServer
) -> None:
    """50 concurrent reports of the same rejected token over HTTP: one new token request."""
    client = served.client
    rejected = client.get("/v1/tokens/svc", headers=auth()).json()["access_token"]
    auth_server.latency = 0.05
    results = stampede(
        50,
        lambda: client.post(
            "/v1/tokens/svc/invalidate", json={"access_token": rejected}, headers=auth()
        ).json(),
    )
    assert auth_server.count("client_credentials") == 2
    assert len({r["access_token"] for r in results}) == 1  # type: ignore[index]
    assert sum(r["invalidated"] for r in results) == 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault(status=503, body="", headers={"Retry-After": "40"}), 503, "provider_unavailable"),
        (Fault(status=401, body='{"error":"invalid_client"}'), 500, "provider_misconfigured"),
        (Fault(status=400, body='{"error":"invalid_grant"}'), 409, "reauthorization_required"),
    ],
)
def test_error_table(
    served: Served,
    broker: Broker,
    auth_server: AuthorizationServer,
    fault: Fault,
    status: int,
    code: str,
) -> None:
    """Provider failures map to 503 (+ Retry-After) / 500 / 409 with the stable error codes."""
    auth_server.inject(fault, times=None)
    provider = "rt" if code == "reauthorization_required" else "svc"
    response = served.client.get(f"/v1/tokens/{provider}", headers=auth())
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.headers["cache-control"] == "no-store"
    if status == 503:
        assert int(response.headers["retry-after"]) >= 40


def test_providers_lists_only_allowed_ones(served: Served, broker: Broker) -> None:
    """GET /v1/providers shows the consumer's providers with state, nothing else."""
    client = served.client
    client.get("/v1/tokens/svc", headers=auth())
    body = client.get("/v1/providers", headers=auth()).json()
    names = {p["name"]: p for p in body["providers"]}
    assert set(names) == {"svc", "rt"}
    assert names["svc"]["state"] == "valid"
    assert names["rt"]["state"] == "empty"


def test_probes_and_readiness(
    served: Served, broker: Broker, auth_server: AuthorizationServer
) -> None:
    """livez is always 200; readyz waits for required providers; health reports degradation."""
    client = served.client
    assert client.get("/livez").json() == {
        "status": "ok",
        "store": None,
        "providers": None,
        "degraded": None,
    }
    assert client.get("/readyz").status_code == 503
    client.get("/v1/tokens/svc", headers=auth())
    assert client.get("/readyz").status_code == 200
    auth_server.inject(Fault(status=500, body=""), times=None)
    client.get("/v1/tokens/rt", headers=auth())
    health = client.get("/healthz").json()
    assert health["status"] == "degraded"
    assert health["providers"]["rt"] in ("failed", "reauthorization_required")
    assert client.get("/health").json() == health


def test_metrics_count_without_secrets(
    served: Served, broker: Broker, auth_server: AuthorizationServer
) -> None:
    """/metrics exposes tokenbroker_* counters and no token or key."""
    client = served.client
    token = client.get("/v1/tokens/svc", headers=auth()).json()["access_token"]
    text = client.get("/metrics").text
    assert 'tokenbroker_token_requests_total{outcome="ok",provider="svc"} 1.0' in text
    assert 'tokenbroker_token_reads_total{provider="svc"} 1.0' in text
    assert 'tokenbroker_consumer_requests_total{route="/v1/tokens/{provider}",status="200"}' in text
    assert "tokenbroker_credentials" in text
    assert token not in text and KEY not in text


def test_bad_requests(served: Served, broker: Broker) -> None:
    """Oversized bodies get 413; malformed JSON and unknown fields get 400 invalid_request."""
    client = served.client
    big = client.post("/v1/tokens/svc/invalidate", content=b"x" * 100_000, headers=auth())
    assert big.status_code == 413
    huge_header = client.get("/v1/providers", headers={**auth(), "X-Filler": "a" * 32_000})
    assert huge_header.status_code == 431
    assert huge_header.json()["error"]["code"] == "headers_too_large"
    for body in (b"{", b'{"access_token": "a", "refresh_token": "x"}', b"[]"):
        response = client.post(
            "/v1/tokens/svc/invalidate",
            content=body,
            headers={**auth(), "content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_request"
    assert client.get("/nowhere", headers=auth()).status_code == 404


def test_openapi_has_no_refresh_token_field(served: Served, broker: Broker) -> None:
    """No response schema in the OpenAPI document mentions a refresh token."""
    spec = served.client.get("/openapi.json", headers=auth())
    assert spec.status_code == 200
    assert "refresh_token" not in str(spec.json()["components"]["schemas"])


def test_openapi_document_is_served_only_when_enabled_and_only_with_a_key(
    auth_server: AuthorizationServer,
) -> None:
    """By default /openapi.json (and the docs pages) do not exist, with a key or without;
    with server.openapi: true it answers 401 without a key and the document with one."""
    import yaml

    from tokenbroker import parse_settings

    def served_with(server: dict[str, object]) -> list[tuple[int, str]]:
        config = {
            "store": "memory",
            "server": server,
            "providers": {"svc": client_credentials(auth_server)},
        }
        registry = ConsumerRegistry([("etl", hash_key(KEY), [parse_rule("svc")])])
        with (
            Broker(parse_settings(yaml.safe_dump(config), {})) as broker,
            Served(create_app(broker, registry)) as client,
        ):
            answers = [
                client.get(p, headers=h)
                for p in ("/openapi.json", "/docs", "/redoc")
                for h in ({}, auth())
            ]
        return [
            (a.status_code, a.json().get("openapi") or a.json()["error"]["code"]) for a in answers
        ]

    not_found = (404, "not_found")
    assert served_with({}) == [not_found] * 6
    assert served_with({"openapi": True}) == [
        (401, "unauthorized"),
        (200, "3.1.0"),
        *[not_found] * 4,
    ]


def test_failed_key_checks_are_rate_limited_per_source(broker: Broker) -> None:
    """After 3 failed key checks a source gets 429 + Retry-After for unknown keys."""
    registry = ConsumerRegistry([("etl", hash_key(KEY), [parse_rule("svc:read")])])
    app = create_app(broker, registry, limits=RateLimits(auth_failures="3/minute"))
    with Served(app) as client:
        bad = [client.get("/v1/providers", headers=auth(new_key())).status_code for _ in range(3)]
        blocked = client.get("/v1/providers", headers=auth(new_key()))
        token_read = client.get("/v1/tokens/svc", headers=auth(new_key()))
    assert bad == [401, 401, 401]
    assert blocked.status_code == 429
    assert blocked.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert token_read.status_code == 429


def test_a_valid_key_is_served_from_a_source_out_of_failed_key_checks(broker: Broker) -> None:
    """Unknown keys from one address (a NAT) use up its failed-key budget without locking out a
    valid key from that address: it still gets 200 on every route, unknown keys still 429."""
    registry = ConsumerRegistry([("etl", hash_key(KEY), [parse_rule("svc:read")])])
    app = create_app(broker, registry, limits=RateLimits(auth_failures="3/minute"))
    with Served(app) as client:
        bad = [client.get("/v1/providers", headers=auth(new_key())).status_code for _ in range(4)]
        good = [
            client.get("/v1/providers", headers=auth()).status_code,
            client.get("/v1/tokens/svc", headers=auth()).status_code,
        ]
        still_bad = client.get("/v1/tokens/svc", headers=auth(new_key())).status_code
        no_key = client.get("/v1/providers").status_code
    assert bad == [401, 401, 401, 429]
    assert good == [200, 200]
    assert still_bad == 429
    assert no_key == 401


def test_per_consumer_rate_limit(broker: Broker) -> None:
    """A consumer over its `server.rate_limit` gets 429; another consumer is unaffected."""
    registry = ConsumerRegistry(
        [
            ("etl", hash_key(KEY), [parse_rule("svc:read")]),
            ("other", hash_key(OTHER_KEY), [parse_rule("svc:read")]),
        ]
    )
    app = create_app(broker, registry, limits=RateLimits(per_consumer="2/minute"))
    with Served(app) as client:
        statuses = [client.get("/v1/providers", headers=auth()).status_code for _ in range(3)]
        other = client.get("/v1/providers", headers=auth(OTHER_KEY)).status_code
    assert statuses == [200, 200, 429]
    assert other == 200


def test_cors_allow_list(auth_server: AuthorizationServer, make_broker: BrokerFactory) -> None:
    """CORS headers are sent only for configured origins; none are configured by default."""
    plain = make_broker({"svc": client_credentials(auth_server)})
    with Served(create_app(plain, ConsumerRegistry())) as client:
        response = client.get("/livez", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
    import yaml

    from tokenbroker import parse_settings

    config = {"store": "memory", "server": {"cors_origins": ["https://app.example"]}}
    with (
        Broker(parse_settings(yaml.safe_dump(config), {})) as broker2,
        Served(create_app(broker2, ConsumerRegistry())) as client,
    ):
        allowed = client.get("/livez", headers={"Origin": "https://app.example"})
        denied = client.get("/livez", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in denied.headers


def test_json_logs_carry_request_ids_and_no_secrets(
    served: Served, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    """With JSON logging on, each request's lines carry its id; no token or key appears."""
    import json
    import logging

    from tokenbroker.telemetry.logs import configure

    configure("info", "json")
    try:
        response = served.client.get("/v1/tokens/svc", headers=auth())
        token = response.json()["access_token"]
        served.client.get("/v1/tokens/secret-svc", headers=auth())
    finally:
        configure("warning", "text")
        logging.getLogger().setLevel(logging.WARNING)
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    rid = response.headers["x-request-id"]
    mine = [line for line in lines if line.get("request_id") == rid]
    assert {line["logger"] for line in mine} >= {"tokenbroker.audit"}
    audits = [line["message"] for line in lines if line["logger"] == "tokenbroker.audit"]
    assert "token read consumer=etl provider=svc scope=read outcome=ok" in audits
    assert "token read consumer=etl provider=secret-svc scope=None outcome=not_found" in audits
    text = json.dumps(lines)
    assert token not in text and KEY not in text


def test_health_checks_the_store_off_the_event_loop(
    tmp_path: Path, auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """With the store file write-locked by another connection, a refresh waits out the busy
    timeout holding the store and /health waits for it too, but in a worker thread: cache-hit
    token reads on the same server keep answering within 0.5 s."""
    path = tmp_path / "tokenbroker.db"
    store = open_store(f"sqlite:///{path}", Keyring([Secret(generate_key())]), busy_timeout=2.0)
    broker = make_broker({"svc": client_credentials(auth_server)}, store=store)
    registry = ConsumerRegistry([("etl", hash_key(KEY), [parse_rule("svc")])])
    served = Served(create_app(broker, registry, limits=RateLimits(auth_failures="1000/minute")))
    health_took: list[float] = []
    misses: list[int] = []
    try:
        with served as client:
            assert client.get("/v1/tokens/svc", headers=auth()).status_code == 200
            locker = sqlite3.connect(path, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")
            try:

                def miss() -> None:  # a new key: its fetch blocks on the store's write lock
                    with httpx.Client(base_url=served.url, timeout=30) as other:
                        reply = other.get(
                            "/v1/tokens/svc", params={"scope": "write"}, headers=auth()
                        )
                    misses.append(reply.status_code)

                def health() -> None:
                    with httpx.Client(base_url=served.url, timeout=30) as other:
                        while not misses:
                            began = time.perf_counter()
                            other.get("/health")
                            health_took.append(time.perf_counter() - began)

                threads = [threading.Thread(target=miss), threading.Thread(target=health)]
                for thread in threads:
                    thread.start()
                worst = 0.0
                while not misses:
                    began = time.perf_counter()
                    assert client.get("/v1/tokens/svc", headers=auth()).status_code == 200
                    worst = max(worst, time.perf_counter() - began)
                for thread in threads:
                    thread.join(30)
            finally:
                locker.execute("ROLLBACK")
                locker.close()
    finally:
        store.close()
    assert misses == [503]
    assert max(health_took) > 1.0  # the store really was stalled while /health asked
    assert worst < 0.5, f"a cache hit waited {worst:.2f} s behind /health"


# -- scopes: one canonical value for the ACL, the cache key and the token request -------------

READER_KEY = new_key()
ANY_KEY = new_key()

#: Query strings for GET /v1/tokens/svc (raw, so every encoding is tried as sent).
SCOPE_QUERIES = [
    "",
    "scope",
    "scope=",
    "scope=%20",
    "scope=+++",
    "scope=%09",
    "scope=%0A",
    "scope=%0D%0A",
    "scope=%00",
    "scope=read",
    "scope=+read+",
    "scope=read+read",
    "scope=read%20%20read",
    "scope=READ",
    "scope=Read",
    "scope=write",
    "scope=read+write",
    "scope=write+read",
    "scope=read%09write",
    "scope=read%0Awrite",
    "scope=read%0Bwrite",
    "scope=read%0Cwrite",
    "scope=read,write",
    "scope=read%C2%A0write",
    "scope=read&scope=write",
    "scope=write&scope=read",
    "scope=&scope=read",
    "scope=read&scope=",
    "scope[]=read&scope[]=write",
]
#: ``scope`` values for POST /v1/tokens/svc/invalidate (absent, null, strings, lists).
SCOPE_BODIES: list[object] = [
    ...,
    None,
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    "\x00",
    "read",
    " read ",
    "read read",
    "READ",
    "write",
    "read write",
    "read\twrite",
    "read\nwrite",
    "read\u00a0write",
    [],
    [""],
    ["read"],
    ["read", "write"],
    ["read write"],
    {"scope": "read"},
    0,
    False,
]


@pytest.fixture
def scoped(auth_server: AuthorizationServer, make_broker: BrokerFactory) -> Iterator[Served]:
    """svc (configured scope ``read``; its client may get ``read write``, which a request with
    no scope is granted) and rt2 (configured ``read write``), served to ``reader`` (allowed
    ``svc:read`` and ``rt2:read``) and ``any`` (allowed ``svc``)."""
    auth_server.add_client("rt2-client", None, auth_method="none", scopes=["read", "write"])
    seed = auth_server.issue_refresh_token("rt2-client")
    broker = make_broker(
        {
            "svc": client_credentials(auth_server, scopes=["read"]),
            "rt2": refresh_token(
                auth_server, seed, client_id="rt2-client", scopes=["read", "write"]
            ),
        }
    )
    registry = ConsumerRegistry(
        [
            ("reader", hash_key(READER_KEY), [parse_rule("svc:read"), parse_rule("rt2:read")]),
            ("any", hash_key(ANY_KEY), [parse_rule("svc")]),
        ]
    )
    served = Served(create_app(broker, registry, limits=RateLimits(auth_failures="1000/minute")))
    with served:
        yield served


def _granted(response: object) -> set[str]:
    body = response.json()  # type: ignore[attr-defined]
    return set((body.get("scope") or "").split())


def _token_requests_within(auth_server: AuthorizationServer, allowed: set[str]) -> None:
    """Every token request the server saw named its scope, and only scopes in ``allowed``."""
    for record in auth_server.requests:
        if record.grant not in ("client_credentials", "refresh_token"):
            continue
        scope = record.form.get("scope")
        assert scope, f"a {record.grant} request with no scope: the IdP grants every scope"
        assert set(scope.split()) <= allowed, f"asked the IdP for {scope!r}"


def test_no_scope_spelling_gets_more_than_the_acl_allows(
    scoped: Served, auth_server: AuthorizationServer
) -> None:
    """A consumer allowed only svc:read, trying every spelling of scope on GET and invalidate,
    never gets a token granted more than ``read`` and never makes the broker send a token
    request with fewer restrictions (no scope, or more) than the ACL checked."""
    client = scoped.client
    statuses = {}
    for query in SCOPE_QUERIES:
        response = client.get(f"/v1/tokens/svc?{query}", headers=auth(READER_KEY))
        if response.status_code == 200:
            assert _granted(response) <= {"read"}, (query, response.json()["scope"])
        statuses[query] = response.status_code
    for value in SCOPE_BODIES:
        body = {"access_token": "rejected-token"}
        if value is not ...:
            body["scope"] = value  # type: ignore[assignment]
        response = client.post("/v1/tokens/svc/invalidate", json=body, headers=auth(READER_KEY))
        if response.status_code == 200:
            assert _granted(response) <= {"read"}, (value, response.json()["scope"])
        statuses[repr(value)] = response.status_code
    _token_requests_within(auth_server, {"read"})
    ok = {"", "scope", "scope=", "scope=%20", "scope=+++", "scope=read", "scope=+read+"}
    ok |= {"scope=read+read", "scope=read%20%20read", "scope[]=read&scope[]=write"}
    ok |= {repr(v) for v in (..., None, "", " ", "   ", "read", " read ", "read read")}
    for spelling, status in statuses.items():
        assert (status == 200) if spelling in ok else (status in (400, 404)), (spelling, status)
    malformed = ["scope=%09", "scope=read%0Awrite", "scope=read%C2%A0write", "scope=read&scope="]
    assert {q: statuses[q] for q in malformed} == dict.fromkeys(malformed, 400)
    # Case-sensitive, and a comma is a scope-token character: all are scopes not allowed.
    assert statuses["scope=READ"] == statuses["scope=write"] == statuses["scope=read,write"] == 404
    assert auth_server.count("client_credentials") == 1  # every accepted spelling is one key


def test_over_long_scope_or_account_is_invalid(scoped: Served) -> None:
    """A scope over 1024 characters or an account over 256 is a 400, on GET and invalidate."""
    client = scoped.client
    long_scope = "read " * 205
    assert len(long_scope) > 1024
    responses = [
        client.get("/v1/tokens/svc", params={"scope": long_scope}, headers=auth(READER_KEY)),
        client.get("/v1/tokens/svc", params={"account": "a" * 257}, headers=auth(READER_KEY)),
        client.post(
            "/v1/tokens/svc/invalidate",
            json={"access_token": "x", "scope": long_scope},
            headers=auth(READER_KEY),
        ),
    ]
    assert [r.status_code for r in responses] == [400, 400, 400]
    assert {r.json()["error"]["code"] for r in responses} == {"invalid_request"}


def test_audit_lines_show_the_canonical_scope_never_raw_input(
    scoped: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit line carries the canonical scope, or ``<invalid>``: a newline in a scope
    cannot forge a second log line."""
    caplog.set_level("INFO", logger="tokenbroker.audit")
    client = scoped.client
    client.get("/v1/tokens/svc?scope=read+read", headers=auth(READER_KEY))
    client.get("/v1/tokens/svc?scope=read%0Aoutcome=ok", headers=auth(READER_KEY))
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenbroker.audit"]
    assert lines == [
        "token read consumer=reader provider=svc scope=read outcome=ok",
        "token read consumer=reader provider=svc scope=<invalid> outcome=invalid_request",
    ]


def test_audit_lines_name_the_scope_that_was_served(
    scoped: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A token read and an invalidate that name no scope are audited with the configured scope
    they were served (scope=read, as the cache's own line for the token says), never None."""
    caplog.set_level("INFO", logger="tokenbroker")
    client = scoped.client
    read = client.get("/v1/tokens/svc", headers=auth(READER_KEY))
    body = {"access_token": read.json()["access_token"]}
    invalidated = client.post("/v1/tokens/svc/invalidate", json=body, headers=auth(READER_KEY))
    assert (read.status_code, invalidated.status_code) == (200, 200)
    audits = [r.getMessage() for r in caplog.records if r.name == "tokenbroker.audit"]
    assert audits == [
        "token read consumer=reader provider=svc scope=read outcome=ok",
        "token invalidate consumer=reader provider=svc scope=read outcome=ok",
    ]
    acquired = [r.getMessage() for r in caplog.records if r.name == "tokenbroker.cache"]
    acquired = [line for line in acquired if line.startswith("token acquired")]
    assert len(acquired) == 2
    assert all(line.startswith("token acquired provider=svc scope=read ") for line in acquired)


def test_audit_lines_name_the_pool_account_that_was_served(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A token read for one account of a login pool is audited with that account."""
    broker = make_broker({"db": login(auth_server)})
    registry = ConsumerRegistry([("etl", hash_key(KEY), [parse_rule("db")])])
    caplog.set_level("INFO", logger="tokenbroker.audit")
    with Served(create_app(broker, registry)) as client:
        assert client.get("/v1/tokens/db?account=bob", headers=auth()).status_code == 200
    audits = [r.getMessage() for r in caplog.records if r.name == "tokenbroker.audit"]
    assert audits == ['token read consumer=etl provider=db scope="" account=bob outcome=ok']


def test_audit_values_are_quoted_so_a_path_cannot_forge_fields_or_lines(
    scoped: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider name from the path with a newline, a space or a quote is written JSON-quoted
    in the audit line: one line, and no forged ``outcome=`` field."""
    caplog.set_level("INFO", logger="tokenbroker.audit")
    client = scoped.client
    client.get("/v1/tokens/x%0Aoutcome=ok", headers=auth(READER_KEY))
    client.get("/v1/tokens/x%20outcome=ok%22", headers=auth(READER_KEY))
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenbroker.audit"]
    assert lines == [
        'token read consumer=reader provider="x\\noutcome=ok" scope=None outcome=not_found',
        'token read consumer=reader provider="x outcome=ok\\"" scope=None outcome=not_found',
    ]


def test_refresh_token_provider_serves_only_its_configured_scopes(
    scoped: Served, auth_server: AuthorizationServer
) -> None:
    """A refresh-token credential is one grant with one scope: a consumer allowed rt2:read
    asking for ``read`` gets a 404, not a token granted the configured ``read write``."""
    client = scoped.client
    for query in ("scope=read", "scope=read+write", "scope=", ""):
        response = client.get(f"/v1/tokens/rt2?{query}", headers=auth(READER_KEY))
        if response.status_code == 200:
            assert _granted(response) <= {"read"}, (query, response.json()["scope"])
        assert response.status_code == 404, query
    assert auth_server.count("refresh_token") == 0


def test_distinct_scope_sets_are_bounded(scoped: Served, auth_server: AuthorizationServer) -> None:
    """A consumer allowed any scope asking for 200 bogus scopes: at most ``max_scopes`` (16)
    token requests and stored rows; the rest get 400 too_many_scopes without a request."""
    client = scoped.client
    codes = []
    for i in range(200):
        response = client.get(f"/v1/tokens/svc?scope=bogus{i}", headers=auth(ANY_KEY))
        codes.append((response.status_code, response.json()["error"]["code"]))
    assert auth_server.count("client_credentials") <= 16
    assert codes[-1] == (400, "too_many_scopes")
    assert codes.count((400, "too_many_scopes")) >= 200 - 16
    assert client.get("/v1/tokens/svc", headers=auth(ANY_KEY)).status_code == 200


def test_invalidate_has_a_cooldown(scoped: Served, auth_server: AuthorizationServer) -> None:
    """Ten reports of each successive current token within the cooldown force one new token
    request; the others get the current token back with ``invalidated: false``."""
    client = scoped.client
    current = client.get("/v1/tokens/svc", headers=auth(READER_KEY)).json()["access_token"]
    dropped = []
    for _ in range(10):
        body = client.post(
            "/v1/tokens/svc/invalidate", json={"access_token": current}, headers=auth(READER_KEY)
        ).json()
        dropped.append(body["invalidated"])
        current = body["access_token"]
    assert auth_server.count("client_credentials") == 2
    assert dropped == [True] + [False] * 9


def test_the_api_follows_stored_consumers_while_it_runs(broker: Broker) -> None:
    """With its default registry, the API (ASGI lifespan on) accepts a consumer stored while
    it runs and refuses it once removed, each within 2 s."""

    def status() -> int:
        return httpx.get(served.url + "/v1/providers", headers=auth()).status_code

    def within(seconds: float, *expected: int) -> None:
        deadline = time.monotonic() + seconds
        while status() not in expected:
            assert time.monotonic() < deadline, f"not {expected} within {seconds} s"
            time.sleep(0.02)

    served = ServedApp(create_app(broker), lifespan="on").start()
    try:
        assert status() == 401
        broker.store.add_consumer("late", hash_key(KEY), ["svc"])
        within(2.0, 200)
        broker.store.remove_consumer("late")
        # Refused: 401, or 429 once this address has used up its failed-key checks (the
        # polling while the key was unknown spent them; a valid key is served regardless).
        within(2.0, 401, 429)
    finally:
        served.stop()


def test_health_and_providers_report_the_worst_pool_account(
    auth_server: AuthorizationServer, make_broker: BrokerFactory
) -> None:
    """One pool account whose login fails makes its provider ``failed`` in /health, /healthz
    and /v1/providers (not the first account's ``valid``); a scope a consumer invented and the
    server refused does not mark its provider failed."""
    pool = login(
        auth_server,
        credentials=[
            {"username": "alice", "password": "alice-pw"},
            {"username": "bob", "password": "not-bobs-pw"},
        ],
    )
    broker = make_broker({"svc": client_credentials(auth_server), "db": pool})
    registry = ConsumerRegistry([("etl", hash_key(KEY), [parse_rule("svc"), parse_rule("db")])])
    with Served(create_app(broker, registry)) as client:
        refused = client.get("/v1/tokens/svc", params={"scope": "admin"}, headers=auth())
        assert refused.status_code >= 400  # the server refuses that scope
        assert client.get("/v1/tokens/svc", headers=auth()).status_code == 200
        assert client.get("/v1/tokens/db", headers=auth()).status_code == 200  # alice
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/health").json()["providers"]["svc"] == "valid"
        names = {
            p["name"]: p for p in client.get("/v1/providers", headers=auth()).json()["providers"]
        }
        assert names["svc"]["state"] == "valid"
        failed = client.get("/v1/tokens/db", params={"account": "bob"}, headers=auth())
        assert failed.status_code >= 400
        health = client.get("/health").json()
        assert health["status"] == "degraded"
        assert health["providers"] == {"svc": "valid", "db": "failed"}
        assert client.get("/healthz").json() == health
        names = {
            p["name"]: p for p in client.get("/v1/providers", headers=auth()).json()["providers"]
        }
        assert names["db"]["state"] == "failed"
        assert names["db"]["last_error"] == "ClientAuthenticationError"
        assert names["svc"]["state"] == "valid"
