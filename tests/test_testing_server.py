"""Tests for tokenbroker.testing: the bundled authorization server, over real sockets."""

from __future__ import annotations

import base64
import http.client
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote_plus

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

import tokenbroker.testing
from tokenbroker.testing import AuthorizationServer, Fault, decode_client_secret_basic

ODD_ID = "id:with%odd+chars é"
ODD_SECRET = "se:cr%et+with spaces é"


class FakeClock:
    """A settable clock for expiry and grace windows."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def basic(client_id: str, secret: str) -> str:
    """Build a client_secret_basic header per RFC 6749 §2.3.1."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


def cc(client: httpx.Client, server: AuthorizationServer, **data: str) -> httpx.Response:
    return client.post(
        server.token_url,
        data={"grant_type": "client_credentials", **data},
        headers={"Authorization": basic("svc", "pw")},
    )


def refresh(client: httpx.Client, server: AuthorizationServer, token: str) -> httpx.Response:
    return client.post(
        server.token_url,
        data={"grant_type": "refresh_token", "refresh_token": token},
        headers={"Authorization": basic("svc", "pw")},
    )


def resource(client: httpx.Client, server: AuthorizationServer, token: str) -> int:
    return client.get(server.resource_url, headers={"Authorization": f"Bearer {token}"}).status_code


def make_server(**options: Any) -> AuthorizationServer:
    server = AuthorizationServer(**options)
    server.add_client("svc", "pw", scopes=["read", "write"])
    return server


def assertion(key: Any, client_id: str, aud: str, alg: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
        **claims,
    }
    return jwt.encode(payload, key, algorithm=alg)


def jwt_form(token: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": token,
    }


def test_exports_are_sorted() -> None:
    """The public surface of tokenbroker.testing is a sorted __all__ of real names."""
    assert tokenbroker.testing.__all__ == sorted(tokenbroker.testing.__all__)
    for name in tokenbroker.testing.__all__:
        assert getattr(tokenbroker.testing, name) is not None


def test_client_credentials_basic_decodes_rfc6749_form_encoding(client: httpx.Client) -> None:
    """client_secret_basic with ':', '%', '+', ' ' and 'é' in id and secret is accepted."""
    server = AuthorizationServer(expires_in=120)
    server.add_client(ODD_ID, ODD_SECRET, scopes=["read", "write"])
    header = basic(ODD_ID, ODD_SECRET)
    with server:
        reply = client.post(
            server.token_url,
            data={"grant_type": "client_credentials", "scope": "read"},
            headers={"Authorization": header},
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 120
        assert body["scope"] == "read"
        assert "refresh_token" not in body
        assert server.issued_access_tokens == [body["access_token"]]
        assert server.requests[0].headers["authorization"] == header
        ok = client.get(
            server.resource_url, headers={"Authorization": f"Bearer {body['access_token']}"}
        )
        assert ok.json() == {"ok": True, "subject": ODD_ID}


def test_decode_client_secret_basic_uses_unquote_plus() -> None:
    """A '+' in the form-encoded pair decodes to a space, malformed headers to None."""
    assert decode_client_secret_basic(basic("a b", "c+d")) == ("a b", "c+d")
    assert decode_client_secret_basic("Basic " + base64.b64encode(b"\xe9:x").decode()) is None
    assert decode_client_secret_basic("Basic !!!") is None
    assert decode_client_secret_basic("Bearer abc") is None


def test_client_credentials_bad_secret_is_401_invalid_client(client: httpx.Client) -> None:
    """A wrong Basic secret answers 401 invalid_client with a Basic challenge."""
    with make_server() as server:
        reply = client.post(
            server.token_url,
            data={"grant_type": "client_credentials"},
            headers={"Authorization": basic("svc", "wrong")},
        )
    assert reply.status_code == 401
    assert reply.json()["error"] == "invalid_client"
    assert reply.headers["WWW-Authenticate"].startswith("Basic ")


def test_client_credentials_post(client: httpx.Client) -> None:
    """client_secret_post works, and only for a client registered for it."""
    server = make_server()
    server.add_client("poster", "p w+é", auth_method="client_secret_post", scopes="read")
    with server:
        good = client.post(
            server.token_url,
            data={
                "grant_type": "client_credentials",
                "client_id": "poster",
                "client_secret": "p w+é",
            },
        )
        wrong_method = client.post(
            server.token_url,
            data={"grant_type": "client_credentials"},
            headers={"Authorization": basic("poster", "p w+é")},
        )
    assert good.status_code == 200, good.text
    assert good.json()["scope"] == "read"
    assert wrong_method.status_code == 401


def test_private_key_jwt_ec_and_reused_jti(client: httpx.Client) -> None:
    """An ES256 private_key_jwt assertion is accepted once; replaying its jti is rejected."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    server = AuthorizationServer()
    server.add_client(
        "jwt-app", auth_method="private_key_jwt", public_key=pem.decode(), scopes=["read"]
    )
    with server:
        token = assertion(key, "jwt-app", server.token_url, "ES256")
        first = client.post(server.token_url, data=jwt_form(token))
        replay = client.post(server.token_url, data=jwt_form(token))
        recorded = server.requests[0].form["client_assertion"]
    assert first.status_code == 200, first.text
    assert first.json()["scope"] == "read"
    assert replay.json()["error"] == "invalid_client"
    sent_jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert jwt.decode(recorded, options={"verify_signature": False})["jti"] == sent_jti


def test_private_key_jwt_ps256_jwk_rejects_bad_aud_and_time(client: httpx.Client) -> None:
    """A PS256 client (JWK key) is rejected for a wrong aud, stale exp or future iat."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    server = AuthorizationServer()
    server.add_client("rsa-app", auth_method="private_key_jwt", public_key=public_jwk)
    now = int(time.time())
    with server:
        bad = [
            assertion(key, "rsa-app", server.url, "PS256"),
            assertion(key, "rsa-app", server.token_url, "PS256", exp=now - 120, iat=now - 180),
            assertion(key, "rsa-app", server.token_url, "PS256", iat=now + 120, exp=now + 180),
        ]
        errors = [client.post(server.token_url, data=jwt_form(t)).json()["error"] for t in bad]
        ok = client.post(
            server.token_url, data=jwt_form(assertion(key, "rsa-app", server.token_url, "PS256"))
        )
    assert errors == ["invalid_client"] * 3
    assert ok.status_code == 200, ok.text


def test_unsupported_keys_and_unknown_assertion_subjects(client: httpx.Client) -> None:
    """DSA keys are refused; assertions for unknown clients or with a wrong key are 400."""
    server = AuthorizationServer()
    with pytest.raises(ValueError):
        server.add_client(
            "dsa",
            auth_method="private_key_jwt",
            public_key=dsa.generate_private_key(1024).public_key(),
        )
    key = ec.generate_private_key(ec.SECP256R1())
    server.add_client("ec", auth_method="private_key_jwt", public_key=key.public_key())
    impostor = ec.generate_private_key(ec.SECP256R1())
    with server:
        ghost = client.post(
            server.token_url, data=jwt_form(assertion(key, "ghost", server.token_url, "ES256"))
        )
        forged = client.post(
            server.token_url, data=jwt_form(assertion(impostor, "ec", server.token_url, "ES256"))
        )
    assert (ghost.status_code, ghost.json()["error"]) == (400, "invalid_client")
    assert (forged.status_code, forged.json()["error"]) == (400, "invalid_client")


def test_strict_rotation_reuse_revokes_family(client: httpx.Client) -> None:
    """Strict rotation issues successors; reusing a spent token kills the whole family."""
    server = make_server(rotation="strict")
    seed = server.issue_refresh_token("svc", scope="read")
    with server:
        first = refresh(client, server, seed).json()
        second = refresh(client, server, first["refresh_token"]).json()
        assert second["scope"] == "read"
        assert resource(client, server, second["access_token"]) == 200
        reuse = refresh(client, server, seed)
        assert (reuse.status_code, reuse.json()["error"]) == (400, "invalid_grant")
        newest = refresh(client, server, second["refresh_token"])
        assert newest.json()["error"] == "invalid_grant"
        assert resource(client, server, first["access_token"]) == 401
        assert resource(client, server, second["access_token"]) == 401
    assert len({seed, first["refresh_token"], second["refresh_token"]}) == 3
    assert server.reused_refresh_tokens() == {seed}


def test_strict_rotation_leaves_other_families_alone(client: httpx.Client) -> None:
    """Revoking one family on reuse does not affect another family of the same client."""
    server = make_server()
    seed_a, seed_b = server.issue_refresh_token("svc"), server.issue_refresh_token("svc")
    with server:
        refresh(client, server, seed_a)
        refresh(client, server, seed_a)
        other = refresh(client, server, seed_b)
    assert other.status_code == 200
    assert other.json()["scope"] == "read write"


def test_strict_rotation_concurrent_presentations_spend_token_once() -> None:
    """20 simultaneous refreshes with one token: exactly one succeeds, all are counted."""
    server = make_server()
    seed = server.issue_refresh_token("svc")
    barrier = threading.Barrier(20)

    def attempt() -> int:
        with httpx.Client(timeout=5) as c:
            barrier.wait()
            return refresh(c, server, seed).status_code

    with server, ThreadPoolExecutor(max_workers=20) as pool:
        statuses = sorted(pool.map(lambda _: attempt(), range(20)))
    assert statuses == [200] + [400] * 19
    assert server.count("refresh_token") == 20
    assert server.reused_refresh_tokens() == {seed}


def test_public_client_refreshes_without_secret(client: httpx.Client) -> None:
    """A client registered with auth_method="none" refreshes with only its client_id."""
    server = AuthorizationServer()
    server.add_client("spa", auth_method="none", scopes=["read"])
    seed = server.issue_refresh_token("spa")
    with server:
        ok = client.post(
            server.token_url,
            data={"grant_type": "refresh_token", "refresh_token": seed, "client_id": "spa"},
        )
        no_cc = client.post(
            server.token_url, data={"grant_type": "client_credentials", "client_id": "spa"}
        )
    assert ok.status_code == 200, ok.text
    assert no_cc.json()["error"] == "unauthorized_client"


def test_grace_rotation_accepts_reuse_within_window_only(client: httpx.Client) -> None:
    """Grace rotation honours a repeat inside the window, then revokes the family after it."""
    clock = FakeClock()
    server = make_server(rotation="grace", reuse_grace_seconds=10, clock=clock)
    seed = server.issue_refresh_token("svc")
    with server:
        first = refresh(client, server, seed).json()
        clock.now += 5
        again = refresh(client, server, seed)
        assert again.status_code == 200
        assert again.json()["refresh_token"] != first["refresh_token"]
        clock.now += 6
        late = refresh(client, server, seed)
        assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
        assert resource(client, server, first["access_token"]) == 401
        assert refresh(client, server, again.json()["refresh_token"]).status_code == 400


def test_non_rotating_keeps_the_same_refresh_token(client: httpx.Client) -> None:
    """non_rotating replies carry no refresh_token and the original keeps working."""
    server = make_server(rotation="non_rotating")
    seed = server.issue_refresh_token("svc", scope="write")
    with server:
        replies = [refresh(client, server, seed) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert all("refresh_token" not in r.json() for r in replies)
    assert server.presented_refresh_tokens == [seed] * 3
    assert server.count("refresh_token") == 3


def test_login_required_mode_for_reuse_and_unknown(client: httpx.Client) -> None:
    """Tesla mode answers 401 login_required for reused and unknown refresh tokens."""
    server = make_server(reuse_error="login_required")
    seed = server.issue_refresh_token("svc")
    with server:
        assert refresh(client, server, seed).status_code == 200
        reused = refresh(client, server, seed)
        unknown = refresh(client, server, "never-issued")
    assert (reused.status_code, reused.json()["error"]) == (401, "login_required")
    assert (unknown.status_code, unknown.json()["error"]) == (401, "login_required")


def test_refresh_with_scope_outside_original_is_invalid_scope(client: httpx.Client) -> None:
    """A refresh asking for more scope than granted fails without spending the token."""
    server = make_server()
    seed = server.issue_refresh_token("svc", scope="read")
    with server:
        wider = client.post(
            server.token_url,
            data={"grant_type": "refresh_token", "refresh_token": seed, "scope": "write"},
            headers={"Authorization": basic("svc", "pw")},
        )
        after = refresh(client, server, seed)
    assert wider.json()["error"] == "invalid_scope"
    assert after.status_code == 200


def test_login_json_and_form_and_failure(client: httpx.Client) -> None:
    """Login accepts JSON and form bodies, rejects bad credentials, tokens expire by TTL."""
    clock = FakeClock()
    server = AuthorizationServer(login_ttl_seconds=60, clock=clock)
    server.add_account("alice", "pw é")
    with server:
        as_json = client.post(server.login_url, json={"username": "alice", "password": "pw é"})
        as_form = client.post(server.login_url, data={"username": "alice", "password": "pw é"})
        wrong = client.post(server.login_url, json={"username": "alice", "password": "nope"})
        token = as_json.json()["data"]["token"]
        subject = client.get(server.resource_url, headers={"Authorization": f"Bearer {token}"})
        clock.now += 61
        expired = resource(client, server, token)
    assert as_json.json() == {"code": 0, "data": {"token": token}, "result": [token]}
    assert as_form.status_code == 200
    assert as_form.json()["data"]["token"] != token
    assert (wrong.status_code, wrong.json()) == (401, {"code": 1, "message": "bad credentials"})
    assert subject.json() == {"ok": True, "subject": "alice"}
    assert expired == 401
    assert server.count("login") == 3


def test_resource_rejects_unknown_revoked_and_expired(client: httpx.Client) -> None:
    """The resource answers 401 invalid_token for missing, unknown, revoked, expired tokens."""
    with make_server() as server:
        a = cc(client, server).json()["access_token"]
        b = cc(client, server).json()["access_token"]
        missing = client.get(server.resource_url)
        assert resource(client, server, "never-issued") == 401
        assert resource(client, server, a) == 200
        server.revoke_access_token(a)
        assert resource(client, server, a) == 401
        assert resource(client, server, b) == 200
        assert server.expire_all_access_tokens() == 2
        assert resource(client, server, b) == 401
        assert server.resource_count() == 6
    assert missing.status_code == 401
    assert 'error="invalid_token"' in missing.headers["WWW-Authenticate"]
    assert missing.headers["WWW-Authenticate"].startswith("Bearer ")
    with pytest.raises(KeyError):
        server.revoke_access_token("never-issued")


def test_expires_in_none_omits_expiry(client: httpx.Client) -> None:
    """With expires_in=None the reply has no expires_in and the token never expires."""
    clock = FakeClock()
    with make_server(expires_in=None, clock=clock) as server:
        body = cc(client, server).json()
        clock.now += 10**9
        status = resource(client, server, body["access_token"])
    assert "expires_in" not in body
    assert status == 200


def test_access_tokens_expire_after_expires_in(client: httpx.Client) -> None:
    """An access token is live until expires_in seconds pass on the server clock."""
    clock = FakeClock()
    with make_server(expires_in=30, clock=clock) as server:
        token = cc(client, server).json()["access_token"]
        clock.now += 29
        before = resource(client, server, token)
        clock.now += 1
        after = resource(client, server, token)
    assert (before, after) == (200, 401)


def test_login_malformed_json_is_400(client: httpx.Client) -> None:
    """A login body declared as JSON but not parseable answers 400 and is still counted."""
    with make_server() as server:
        reply = client.post(
            server.login_url, content=b"{nope", headers={"Content-Type": "application/json"}
        )
    assert (reply.status_code, reply.json()["code"]) == (400, 1)
    assert server.count("login") == 1
    assert server.requests[0].json is None


def test_configuration_errors() -> None:
    """Invalid constructor options and client registrations raise ValueError or KeyError."""
    bad_options: list[dict[str, Any]] = [
        {"rotation": "sometimes"},
        {"reuse_error": "teapot"},
        {"expires_in": 0},
        {"reuse_grace_seconds": -1},
    ]
    for options in bad_options:
        with pytest.raises(ValueError):
            AuthorizationServer(**options)
    server = make_server()
    with pytest.raises(ValueError):
        server.add_client("x", "s", auth_method="client_secret_jwt")
    with pytest.raises(ValueError):
        server.add_client("x", auth_method="client_secret_post")
    with pytest.raises(ValueError):
        server.add_client("x", auth_method="private_key_jwt")
    with pytest.raises(KeyError):
        server.issue_refresh_token("nobody")
    with pytest.raises(ValueError):
        server.issue_refresh_token("svc", scope="admin")
    with pytest.raises(ValueError):
        server.latency = -1


def test_transport_reads_chunked_and_rejects_bad_length() -> None:
    """A chunked token request is read and answered; an invalid Content-Length gets 400 and a close."""
    with make_server() as server:
        host, port = server.url.removeprefix("http://").split(":")
        server.add_client("post-client", "post-secret", auth_method="client_secret_post")
        form = b"grant_type=client_credentials&client_id=post-client&client_secret=post-secret"
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(form), form)
        raw = [
            b"POST /oauth/token HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked,
            b"POST /oauth/token HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n",
        ]
        replies = []
        for request in raw:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(request)
                replies.append(read_until_closed(sock))
    assert replies[0].startswith(b"HTTP/1.1 200 "), replies[0][:200]
    assert replies[1].startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in replies[1]


def test_fault_status_is_served_once_then_normal(client: httpx.Client) -> None:
    """A 503 fault with Retry-After answers once, is counted, then the real reply follows."""
    with make_server() as server:
        server.inject(
            Fault(
                status=503, body='{"error":"temporarily_unavailable"}', headers={"Retry-After": "2"}
            ),
            times=1,
            path="/oauth/token",
        )
        faulted = cc(client, server)
        normal = cc(client, server)
    assert faulted.status_code == 503
    assert faulted.headers["Retry-After"] == "2"
    assert faulted.json() == {"error": "temporarily_unavailable"}
    assert normal.status_code == 200
    assert server.count("client_credentials") == 2
    assert len(server.issued_access_tokens) == 1


def test_fault_delay_and_latency(client: httpx.Client) -> None:
    """A delay fault sleeps before the normal reply; latency delays every reply."""
    with make_server() as server:
        server.inject(Fault(delay=0.3))
        started = time.monotonic()
        delayed = cc(client, server)
        delayed_for = time.monotonic() - started
        server.latency = 0.2
        started = time.monotonic()
        slow = client.get(server.resource_url)
        slow_for = time.monotonic() - started
    assert delayed.status_code == 200
    assert delayed_for >= 0.3
    assert slow.status_code == 401
    assert slow_for >= 0.2


def test_in_flight_gauge_counts_concurrent_requests() -> None:
    """max_in_flight is the peak of requests answered at once; reset_counts restarts it."""
    with make_server() as server:
        server.latency = 0.3
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda _: httpx.get(server.resource_url), range(3)))
        assert [r.status_code for r in replies] == [401] * 3
        assert server.max_in_flight == 3
        assert server.in_flight == 0
        server.reset_counts()
        assert server.max_in_flight == 0
        server.latency = 0
        httpx.get(server.resource_url)
        assert server.max_in_flight == 1


def test_fault_malformed_2xx(client: httpx.Client) -> None:
    """A 200 fault with a non-JSON body is delivered verbatim."""
    with make_server() as server:
        server.inject(Fault(status=200, body="not json"))
        reply = cc(client, server)
    assert reply.status_code == 200
    assert reply.text == "not json"
    with pytest.raises(ValueError):
        reply.json()


def test_fault_drop_closes_without_answering() -> None:
    """A drop fault closes the connection without a response; the next request is served."""
    with make_server() as server, httpx.Client(timeout=5) as client:
        server.inject(Fault(drop=True))
        with pytest.raises(httpx.RemoteProtocolError):
            cc(client, server)
        after = cc(client, server)
    assert after.status_code == 200
    assert server.count("client_credentials") == 2


def test_faults_are_fifo_and_path_scoped(client: httpx.Client) -> None:
    """Faults apply in queue order to matching paths; path=None matches any path."""
    with make_server() as server:
        server.inject(Fault(status=502), times=2)
        server.inject(Fault(status=418), path=None)
        server.inject(Fault(status=504), times=None, path="/api/login")
        first_resource = client.get(server.resource_url).status_code
        token_statuses = [cc(client, server).status_code for _ in range(3)]
        logins = [client.post(server.login_url, json={}).status_code for _ in range(2)]
        server.clear_faults()
        cleared = client.post(server.login_url, json={}).status_code
    assert first_resource == 418
    assert token_statuses == [502, 502, 200]
    assert logins == [504, 504]
    assert cleared == 401


def test_fault_validation() -> None:
    """Faults that do nothing or contradict themselves are rejected up front."""
    with pytest.raises(ValueError):
        Fault()
    with pytest.raises(ValueError):
        Fault(status=503, drop=True)
    with pytest.raises(ValueError):
        AuthorizationServer().inject(Fault(status=500), times=0)


def test_counts_presented_tokens_and_reset(client: httpx.Client) -> None:
    """Counts include failed requests, presented tokens are logged in order, resets work."""
    server = make_server()
    seed = server.issue_refresh_token("svc")
    with server:
        successor = refresh(client, server, seed).json()["refresh_token"]
        refresh(client, server, seed)
        client.post(server.token_url, data={"grant_type": "client_credentials"})
        client.post(server.login_url, json={"username": "x", "password": "y"})
        assert server.count("refresh_token") == 2
        assert server.count("client_credentials") == 1
        assert server.count("login") == 1
        assert server.presented_refresh_tokens == [seed, seed]
        assert server.reused_refresh_tokens() == {seed}
        server.reset_counts()
        assert server.count("refresh_token") == 0
        assert len(server.requests) == 4
        server.reset_records()
        assert server.requests == []
        assert server.presented_refresh_tokens == []
    assert successor != seed


def test_refresh_token_report_counts_presentations_and_outcomes(client: httpx.Client) -> None:
    """GET /testing/refresh-tokens reports every presented refresh token by fingerprint (never
    its value) with how often it arrived and what the server did each time: a token presented
    twice is reported twice (accepted, then accepted in grace or rejected as a reuse)."""
    clock = FakeClock()
    server = make_server(rotation="grace", reuse_grace_seconds=10, clock=clock)
    seed = server.issue_refresh_token("svc")
    other = server.issue_refresh_token("svc")
    with server:
        successor = refresh(client, server, seed).json()["refresh_token"]
        refresh(client, server, other)
        refresh(client, server, other)  # a resend inside the grace window
        clock.now += 11
        refresh(client, server, seed)  # outside the window: reuse, the family is revoked
        refresh(client, server, successor)  # its family is revoked
        refresh(client, server, "never-issued")
        server.inject(Fault(status=503))
        refresh(client, server, "faulted")  # arrived, never processed
        reply = client.get(server.url + "/testing/refresh-tokens")
        in_process = server.refresh_token_report()
    assert reply.status_code == 200
    assert reply.headers["Cache-Control"] == "no-store"
    fingerprint = tokenbroker.testing.refresh_token_fingerprint
    expected = [
        (seed, 2, ["accepted", "reused"]),
        (other, 2, ["accepted", "accepted_in_grace"]),
        (successor, 1, ["revoked"]),
        ("never-issued", 1, ["unknown"]),
        ("faulted", 1, []),
    ]
    assert reply.json() == {
        "refresh_tokens": [
            {"fingerprint": fingerprint(token), "presented": count, "outcomes": outcomes}
            for token, count, outcomes in expected
        ]
    }
    assert [(u.fingerprint, u.presented, list(u.outcomes)) for u in in_process] == [
        (fingerprint(token), count, outcomes) for token, count, outcomes in expected
    ]
    assert [(u.accepted_in_grace, u.rejected, u.unprocessed) for u in in_process] == [
        (0, 1, 0),
        (1, 0, 0),
        (0, 1, 0),
        (0, 1, 0),
        (0, 0, 1),
    ]
    for token in (seed, other, successor):
        assert token not in reply.text and token not in repr(in_process)
    server.reset_records()
    assert server.refresh_token_report() == []


def test_routing_404_and_405(client: httpx.Client) -> None:
    """Unknown paths answer 404 and wrong methods 405 with an Allow header."""
    with make_server() as server:
        missing = client.get(server.url + "/nope")
        wrong = client.get(server.token_url)
    assert missing.status_code == 404
    assert (wrong.status_code, wrong.headers["Allow"]) == (405, "POST")


def test_keep_alive_reuses_one_connection() -> None:
    """Several requests travel over one persistent HTTP/1.1 connection."""
    with make_server() as server:
        conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=5)
        try:
            statuses = []
            sockets = set()
            for _ in range(3):
                conn.request("GET", "/api/resource")
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
                sockets.add(id(conn.sock))
        finally:
            conn.close()
    assert statuses == [401, 401, 401]
    assert len(sockets) == 1


def test_start_stop_without_context_manager(client: httpx.Client) -> None:
    """start()/stop() serve and then refuse connections; url is unavailable when stopped."""
    server = make_server()
    server.start()
    try:
        url = server.resource_url
        assert client.get(url).status_code == 401
        with pytest.raises(RuntimeError):
            server.start()
    finally:
        server.stop()
    server.stop()
    with pytest.raises(httpx.ConnectError):
        client.get(url)
    with pytest.raises(RuntimeError):
        _ = server.url


def test_httpx_auth_client_credentials_interop() -> None:
    """httpx-auth's client-credentials flow fetches one token and reuses it."""
    import httpx_auth

    with make_server() as server:
        auth = httpx_auth.OAuth2ClientCredentials(
            server.token_url, client_id="svc", client_secret="pw"
        )
        with httpx.Client(auth=auth, timeout=5) as client:
            statuses = [client.get(server.resource_url).status_code for _ in range(20)]
    assert statuses == [200] * 20
    assert server.count("client_credentials") == 1
    assert server.resource_count() == 20


def test_thousand_concurrent_connections() -> None:
    """1000 connections open at the same time are all accepted and each gets its reply."""
    request = b"GET /api/resource HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    with make_server() as server:
        host, port = server.url.removeprefix("http://").split(":")
        sockets: list[socket.socket] = []
        try:
            for _ in range(1000):
                sockets.append(socket.create_connection((host, int(port)), timeout=30))
            for sock in sockets:
                sock.sendall(request)
            replies = [read_until_closed(sock) for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
    assert all(reply.startswith(b"HTTP/1.1 401 ") for reply in replies)
    assert server.resource_count() == 1000


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
