"""Tests for the bundled authorization server's authorization-code grant, over real sockets.

PKCE S256 required, login and consent pages, ``iss`` on every redirect (RFC 9207), code
single use, refresh tokens only for ``offline_access`` with ``prompt=consent``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tokenbroker.testing import AuthorizationFlowError, AuthorizationServer, complete_authorization

REDIRECT = "http://127.0.0.1:1/v1/oauth/callback"
USER, PASSWORD = "alice", "wonder-land-pw"


def pkce() -> tuple[str, str]:
    """A PKCE verifier and its S256 challenge (RFC 7636 §4.1-§4.2)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorize_url(server: AuthorizationServer, challenge: str, **overrides: str) -> str:
    params = {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": REDIRECT,
        "scope": "openid offline_access read",
        "state": "st-" + secrets.token_urlsafe(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "prompt": "consent",
        **overrides,
    }
    return server.authorize_url + "?" + urlencode({k: v for k, v in params.items() if v})


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def exchange(
    client: httpx.Client, server: AuthorizationServer, code: str, verifier: str, **extra: str
) -> httpx.Response:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "app",
        "code_verifier": verifier,
        **extra,
    }
    return client.post(server.token_url, data=data)


def refresh(client: httpx.Client, server: AuthorizationServer, token: str) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": token, "client_id": "app"}
    return client.post(server.token_url, data=data)


def make_server(rotation: str = "strict") -> AuthorizationServer:
    server = AuthorizationServer(rotation=rotation)  # type: ignore[arg-type]
    server.add_account(USER, PASSWORD)
    server.add_client(
        "app", auth_method="none", scopes="openid offline_access read", redirect_uris=[REDIRECT]
    )
    return server


@pytest.fixture
def server() -> Iterator[AuthorizationServer]:
    with make_server() as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


def code_for(server: AuthorizationServer, challenge: str, **overrides: str) -> dict[str, str]:
    url = authorize_url(server, challenge, **overrides)
    return query(complete_authorization(url, username=USER, password=PASSWORD))


def test_full_flow_yields_code_that_exchanges_for_rotating_refresh_token(
    server: AuthorizationServer, client: httpx.Client
) -> None:
    """Login + consent redirect with code/state/iss; the code buys tokens; the refresh rotates."""
    verifier, challenge = pkce()
    url = authorize_url(server, challenge, state="s-123")
    redirect = complete_authorization(url, username=USER, password=PASSWORD)
    assert redirect.startswith(REDIRECT + "?")
    params = query(redirect)
    assert params["state"] == "s-123" and params["iss"] == server.issuer and params["code"]

    reply = exchange(client, server, params["code"], verifier)
    assert reply.status_code == 200, reply.text
    tokens = reply.json()
    assert tokens["scope"] == "openid offline_access read" and tokens["refresh_token"]
    bearer = {"Authorization": "Bearer " + tokens["access_token"]}
    assert client.get(server.resource_url, headers=bearer).json()["subject"] == "app"

    first = refresh(client, server, tokens["refresh_token"])
    assert first.status_code == 200
    assert first.json()["refresh_token"] != tokens["refresh_token"]
    again = refresh(client, server, tokens["refresh_token"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    [use] = [u for u in server.refresh_token_report() if u.presented == 2]
    assert use.outcomes == ("accepted", "reused")
    assert server.authorization.authorizations == 1
    assert server.count("authorization_code") == 1


def test_non_rotating_policy_applies_to_code_issued_refresh_token(client: httpx.Client) -> None:
    """A code-issued refresh token follows the server's rotation mode like any seeded one."""
    with make_server("non_rotating") as server:
        verifier, challenge = pkce()
        tokens = exchange(client, server, code_for(server, challenge)["code"], verifier).json()
        for _ in range(2):
            reply = refresh(client, server, tokens["refresh_token"])
            assert reply.status_code == 200 and "refresh_token" not in reply.json()


def test_code_replay_is_invalid_grant_and_revokes_what_it_issued(
    server: AuthorizationServer, client: httpx.Client
) -> None:
    """A second exchange of one code fails and kills the first exchange's tokens."""
    verifier, challenge = pkce()
    code = code_for(server, challenge)["code"]
    tokens = exchange(client, server, code, verifier).json()
    replay = exchange(client, server, code, verifier)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    bearer = {"Authorization": "Bearer " + tokens["access_token"]}
    assert client.get(server.resource_url, headers=bearer).status_code == 401
    assert refresh(client, server, tokens["refresh_token"]).json()["error"] == "invalid_grant"
    assert server.count("authorization_code") == 2


def test_wrong_verifier_is_invalid_grant_and_leaves_code_usable(
    server: AuthorizationServer, client: httpx.Client
) -> None:
    """A verifier that does not hash to the challenge is refused; the right one still works."""
    verifier, challenge = pkce()
    code = code_for(server, challenge)["code"]
    wrong = exchange(client, server, code, pkce()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    assert "access_token" not in wrong.json()
    assert exchange(client, server, code, verifier).status_code == 200


def test_redirect_uri_must_repeat_at_token_endpoint(
    server: AuthorizationServer, client: httpx.Client
) -> None:
    """The token request's redirect_uri must equal the authorization request's."""
    verifier, challenge = pkce()
    code = code_for(server, challenge)["code"]
    reply = exchange(client, server, code, verifier, redirect_uri=REDIRECT + "/other")
    assert reply.status_code == 400 and reply.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("method", "challenge"),
    [("plain", "x" * 43), ("", "x" * 43), ("S256", "")],
    ids=["plain", "method-missing", "challenge-missing"],
)
def test_pkce_s256_is_required_and_plain_refused(
    server: AuthorizationServer, client: httpx.Client, method: str, challenge: str
) -> None:
    """Only S256 passes: plain, no method or no challenge redirect invalid_request, no page."""
    url = authorize_url(server, challenge, code_challenge_method=method, state="s1")
    reply = client.get(url)
    assert reply.status_code == 302
    params = query(reply.headers["Location"])
    assert params["error"] == "invalid_request" and params["state"] == "s1"
    assert params["iss"] == server.issuer and "code" not in params
    assert "set-cookie" not in reply.headers


def test_unregistered_redirect_uri_gets_error_page_and_no_redirect(
    server: AuthorizationServer, client: httpx.Client
) -> None:
    """An unregistered (or missing) redirect URI is answered on the server's own page."""
    evil = "http://127.0.0.1:2/cb?<script>alert(1)</script>"
    for uri in (evil, REDIRECT + "/", ""):
        reply = client.get(authorize_url(server, pkce()[1], redirect_uri=uri))
        assert reply.status_code == 400
        assert "location" not in reply.headers
        assert reply.headers["Content-Type"].startswith("text/html")
        assert "<script>" not in reply.text
        assert "code=" not in reply.text


def test_deny_redirects_access_denied_with_state_and_iss(server: AuthorizationServer) -> None:
    """Pressing deny, or the deny_next_consent hook, yields error=access_denied, no code."""
    challenge = pkce()[1]
    for approve in (False, True):
        if approve:
            server.authorization.deny_next_consent()
        url = authorize_url(server, challenge, state="keep-me")
        params = query(
            complete_authorization(url, username=USER, password=PASSWORD, approve=approve)
        )
        assert params["error"] == "access_denied" and params["state"] == "keep-me"
        assert params["iss"] == server.issuer and "code" not in params
    assert server.authorization.authorizations == 0
    assert "code" in code_for(server, challenge)  # the hook was one-shot


def test_iss_equals_discovery_issuer_and_can_be_forged_once(
    server: AuthorizationServer, client: httpx.Client
) -> None:
    """Both discovery documents name the issuer sent as iss; forge_next_iss fakes one redirect."""
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        meta = client.get(server.url + path).json()
        assert meta["issuer"] == server.url
        assert meta["authorization_endpoint"] == server.authorize_url
        assert meta["token_endpoint"] == server.token_url
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert meta["authorization_response_iss_parameter_supported"] is True
    challenge = pkce()[1]
    assert code_for(server, challenge)["iss"] == meta["issuer"]
    server.authorization.forge_next_iss("https://attacker.example")
    assert code_for(server, challenge)["iss"] == "https://attacker.example"
    assert code_for(server, challenge)["iss"] == meta["issuer"]


@pytest.mark.parametrize(
    ("scope", "prompt"),
    [("openid read", "consent"), ("openid offline_access read", "")],
    ids=["no-offline_access", "no-prompt-consent"],
)
def test_no_refresh_token_without_offline_access_and_consent_prompt(
    server: AuthorizationServer, client: httpx.Client, scope: str, prompt: str
) -> None:
    """A refresh token needs offline_access and prompt=consent, as oidc-provider requires."""
    verifier, challenge = pkce()
    code = code_for(server, challenge, scope=scope, prompt=prompt)["code"]
    tokens = exchange(client, server, code, verifier).json()
    assert tokens["access_token"] and "refresh_token" not in tokens
    assert "offline_access" not in tokens["scope"].split()


def _hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match is not None, page
    return match.group(1)


def test_login_form_needs_its_csrf_token(server: AuthorizationServer, client: httpx.Client) -> None:
    """A login POST without (or with a wrong) CSRF token is refused and signs nobody in."""
    page = client.get(authorize_url(server, pkce()[1]), follow_redirects=True)
    uid, csrf = _hidden(page.text, "uid"), _hidden(page.text, "csrf_token")
    login = server.url + "/interaction/login"
    form = {"uid": uid, "username": USER, "password": PASSWORD}
    for bad in ({}, {"csrf_token": ""}, {"csrf_token": csrf[:-1] + "x"}):
        reply = client.post(login, data={**form, **bad})
        assert reply.status_code == 403 and "location" not in reply.headers
    still = client.get(server.url + "/interaction", params={"uid": uid})
    assert 'type="password"' in still.text  # still the login page
    ok = client.post(login, data={**form, "csrf_token": csrf})
    assert ok.status_code == 303


def test_consent_form_needs_session_cookie_of_its_interaction(
    server: AuthorizationServer, client: httpx.Client
) -> None:
    """Another session cannot answer someone's consent form; no session at all gets 403."""
    page = client.get(authorize_url(server, pkce()[1]), follow_redirects=True)
    uid, csrf = _hidden(page.text, "uid"), _hidden(page.text, "csrf_token")
    form = {"uid": uid, "csrf_token": csrf, "username": USER, "password": PASSWORD}
    consent = client.post(server.url + "/interaction/login", data=form, follow_redirects=True)
    assert 'value="approve"' in consent.text
    with httpx.Client(timeout=5) as stranger:
        own = stranger.get(authorize_url(server, pkce()[1]), follow_redirects=True)
        # Its own session and CSRF token, the victim's interaction id.
        answer = {"uid": uid, "csrf_token": _hidden(own.text, "csrf_token")}
        reply = stranger.post(
            server.url + "/interaction/consent", data={**answer, "decision": "approve"}
        )
        assert reply.status_code == 400 and "location" not in reply.headers
        bare = httpx.post(server.url + "/interaction/consent", data={**answer, "decision": "x"})
        assert bare.status_code == 403
    assert server.authorization.authorizations == 0


def test_pages_set_strict_cookie_and_headers_and_never_echo_password(
    server: AuthorizationServer, client: httpx.Client
) -> None:
    """Session cookie is HttpOnly+SameSite=Lax; pages have a strict CSP, no script, no password."""
    first = client.get(authorize_url(server, pkce()[1]))
    assert first.status_code == 303
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    login = client.get(server.url + first.headers["Location"])
    form = {"uid": _hidden(login.text, "uid"), "csrf_token": _hidden(login.text, "csrf_token")}
    post = server.url + "/interaction/login"
    bad = client.post(post, data={**form, "username": USER, "password": "nope-" + PASSWORD})
    good_form = {**form, "username": USER, "password": PASSWORD}
    good = client.post(post, data=good_form, follow_redirects=True)
    assert good.history[0].headers["set-cookie"] != cookie  # a new session id at sign-in
    for page in (login, bad, good):
        csp = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert "<script" not in page.text.lower() and " style=" not in page.text
        assert PASSWORD not in page.text
    assert "Wrong username or password" in bad.text
    assert "http://127.0.0.1:1" in good.headers["Content-Security-Policy"]


def test_driver_reports_refused_login(server: AuthorizationServer) -> None:
    """complete_authorization raises on a wrong password instead of looping, and issues no code."""
    with pytest.raises(AuthorizationFlowError, match="login was refused"):
        complete_authorization(
            authorize_url(server, pkce()[1]), username=USER, password="wrong-password"
        )
    assert server.authorization.authorizations == 0


def test_concurrent_exchanges_of_one_code_issue_exactly_once(server: AuthorizationServer) -> None:
    """Eight simultaneous exchanges of one code: exactly one 200, seven invalid_grant."""
    verifier, challenge = pkce()
    code = code_for(server, challenge)["code"]
    barrier = threading.Barrier(8)

    def attempt() -> int:
        with httpx.Client(timeout=5) as own:
            barrier.wait(5)
            return exchange(own, server, code, verifier).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(lambda _: attempt(), range(8)))
    assert statuses == [200] + [400] * 7
    assert server.count("authorization_code") == 8
