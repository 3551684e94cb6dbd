"""Grants without I/O: the requests they build and how they classify every kind of reply."""

from __future__ import annotations

import base64
import json
import math
import time
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbroker.config import (
    ClientCredentialsProvider,
    Credential,
    LoginProvider,
    RefreshTokenProvider,
)
from tokenbroker.core.secret import Secret
from tokenbroker.errors import (
    ClientAuthenticationError,
    InvalidTokenError,
    ProviderError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
)
from tokenbroker.grants import (
    ClientCredentialsGrant,
    LoginGrant,
    RefreshTokenGrant,
    Reply,
    TokenResponse,
    basic_authorization,
)

TOKEN_URL = "https://idp.example.com/oauth2/token"
LOGIN_URL = "https://db.example.com/api/login"
CS_CANARY = "CANARY_CS_3b9f0d"
RT_CANARY = "CANARY_RT_a41c77"
PW_CANARY = "CANARY_PW_5e02aa"
DESC_CANARY = "CANARY_DESC_91d0c3"
MAX_LIFETIME = 366 * 86400.0
ISSUED = 1_700_000_000.0


def pem(key: Any) -> str:
    """PKCS#8 PEM of an unencrypted private key."""
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data.decode()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    """An EC P-256 key (ES256)."""
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """An RSA 2048 key (RS256)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def cc_settings(**overrides: Any) -> ClientCredentialsProvider:
    """Client-credentials settings with a basic-auth secret unless overridden."""
    data: dict[str, Any] = {
        "grant": "client_credentials",
        "token_url": TOKEN_URL,
        "client_id": "svc",
        "client_secret": CS_CANARY,
        **overrides,
    }
    return ClientCredentialsProvider.model_validate(data)


def rt_settings(**overrides: Any) -> RefreshTokenProvider:
    """Refresh-token settings for a public client (client_auth none) unless overridden."""
    data: dict[str, Any] = {
        "grant": "refresh_token",
        "token_url": TOKEN_URL,
        "client_id": "app",
        "refresh_token": "seed-rt",
        **overrides,
    }
    return RefreshTokenProvider.model_validate(data)


def login_settings(**overrides: Any) -> LoginProvider:
    """Login settings with one account whose password is the canary."""
    data: dict[str, Any] = {
        "grant": "login",
        "login_url": LOGIN_URL,
        "credentials": [{"username": "alice", "password": PW_CANARY}],
        **overrides,
    }
    return LoginProvider.model_validate(data)


def cc_grant(scopes: tuple[str, ...] = (), **overrides: Any) -> ClientCredentialsGrant:
    """A client-credentials grant for provider ``idp``."""
    return ClientCredentialsGrant("idp", cc_settings(**overrides), scopes)


def rt_grant(refresh: str = RT_CANARY, **overrides: Any) -> RefreshTokenGrant:
    """A refresh-token grant for provider ``idp`` holding ``refresh``."""
    return RefreshTokenGrant("idp", rt_settings(**overrides), Secret(refresh))


def login_grant(**overrides: Any) -> LoginGrant:
    """A login grant for account alice."""
    settings = login_settings(**overrides)
    return LoginGrant("db", settings, settings.credentials[0])


def form(request: httpx.Request) -> dict[str, str]:
    """The request's form fields; fails if a field is repeated (RFC 6749 §3.2)."""
    pairs = parse_qsl(request.content.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    fields = dict(pairs)
    assert len(fields) == len(pairs), "a form parameter is repeated"
    return fields


def reply(status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
    """A Reply whose body is JSON-encoded unless it is already bytes."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Reply(status, httpx.Headers(headers or {}), content)


def ok(**fields: Any) -> Reply:
    """A 200 token reply with ``access_token`` plus ``fields``."""
    return reply(200, {"access_token": "at-1", **fields})


# -- client authentication ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_id", "client_secret"),
    [
        ("plain", "secret"),
        ("id:with:colons", "sec:ret"),
        ("per%cent", "100%%"),
        ("plus+id", "a+b+c"),
        ("space id", "s p a c e"),
        ("é-client", "sécrét"),
        ("all :%+ é/&=", ":%+ é/&=?#"),
    ],
)
def test_client_secret_basic_round_trips_rfc6749_encoding(
    client_id: str, client_secret: str
) -> None:
    """Basic auth form-urlencodes id and secret before base64 (RFC 6749 §2.3.1); they decode back."""
    request = cc_grant(client_id=client_id, client_secret=client_secret).build_request()
    scheme, _, encoded = request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    pair = base64.b64decode(encoded, validate=True).decode("ascii")
    assert pair.count(":") == 1, "a ':' inside the id or secret was not percent-encoded"
    raw_id, _, raw_secret = pair.partition(":")
    assert unquote_plus(raw_id) == client_id
    assert unquote_plus(raw_secret) == client_secret
    fields = form(request)
    assert "client_secret" not in fields
    assert "client_id" not in fields
    assert fields == {"grant_type": "client_credentials"}


def test_basic_authorization_encodes_space_as_plus() -> None:
    """A space becomes '+', and '+' becomes '%2B', as application/x-www-form-urlencoded demands."""
    value = basic_authorization("a b", "c+d")
    pair = base64.b64decode(value.removeprefix("Basic ")).decode()
    assert pair == "a+b:c%2Bd"


def test_client_secret_post_sends_credentials_in_the_body() -> None:
    """client_secret_post puts client_id and client_secret in the form and sends no Authorization."""
    request = cc_grant(client_auth="client_secret_post").build_request()
    assert "Authorization" not in request.headers
    assert form(request) == {
        "grant_type": "client_credentials",
        "client_id": "svc",
        "client_secret": CS_CANARY,
    }


def test_token_request_shape() -> None:
    """The token request is a form POST to token_url that asks for JSON (RFC 6749 §4.4.2)."""
    request = cc_grant().build_request()
    assert request.method == "POST"
    assert str(request.url) == TOKEN_URL
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["Accept"] == "application/json"
    assert not request.url.query


def test_public_client_sends_only_its_id() -> None:
    """client_auth none sends client_id in the form and no secret or Authorization."""
    request = rt_grant().build_request()
    assert "Authorization" not in request.headers
    fields = form(request)
    assert fields["client_id"] == "app"
    assert "client_secret" not in fields


@pytest.mark.parametrize(("key_name", "algorithm"), [("ec_key", "ES256"), ("rsa_key", "RS256")])
def test_private_key_jwt_assertion_verifies(
    request: pytest.FixtureRequest, key_name: str, algorithm: str
) -> None:
    """private_key_jwt sends a signed assertion with iss=sub=client_id, aud=token_url (RFC 7523 §3)."""
    key = request.getfixturevalue(key_name)
    grant = cc_grant(client_auth="private_key_jwt", client_secret=None, private_key=pem(key))
    before = int(time.time())
    fields = form(grant.build_request())
    after = int(time.time())
    assert fields["client_assertion_type"] == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    assert fields["client_id"] == "svc"
    assert "client_secret" not in fields
    assert jwt.get_unverified_header(fields["client_assertion"])["alg"] == algorithm
    claims = jwt.decode(
        fields["client_assertion"],
        key.public_key(),
        algorithms=[algorithm],
        audience=TOKEN_URL,
        issuer="svc",
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )
    assert claims["sub"] == "svc"
    assert before <= claims["iat"] <= after
    assert 0 < claims["exp"] - claims["iat"] <= 60
    assert claims["jti"]


def test_private_key_jwt_audience_override(ec_key: ec.EllipticCurvePrivateKey) -> None:
    """assertion_audience replaces token_url as the assertion's aud."""
    grant = cc_grant(
        client_auth="private_key_jwt",
        private_key=pem(ec_key),
        assertion_audience="https://idp.example.com/",
    )
    assertion = form(grant.build_request())["client_assertion"]
    claims = jwt.decode(
        assertion, ec_key.public_key(), algorithms=["ES256"], audience="https://idp.example.com/"
    )
    assert claims["aud"] == "https://idp.example.com/"
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(assertion, ec_key.public_key(), algorithms=["ES256"], audience=TOKEN_URL)


def test_private_key_jwt_fresh_jti_per_request(ec_key: ec.EllipticCurvePrivateKey) -> None:
    """Every build_request signs a new assertion with a jti never used before (RFC 7523 §3)."""
    grant = cc_grant(client_auth="private_key_jwt", private_key=pem(ec_key))
    jtis = [
        jwt.decode(
            form(grant.build_request())["client_assertion"],
            ec_key.public_key(),
            algorithms=["ES256"],
            audience=TOKEN_URL,
        )["jti"]
        for _ in range(20)
    ]
    assert len(set(jtis)) == 20


def test_private_key_jwt_on_refresh_grant(rsa_key: rsa.RSAPrivateKey) -> None:
    """A refresh-token provider can authenticate with private_key_jwt too."""
    grant = rt_grant(client_auth="private_key_jwt", private_key=pem(rsa_key))
    fields = form(grant.build_request())
    assert fields["refresh_token"] == RT_CANARY
    jwt.decode(
        fields["client_assertion"], rsa_key.public_key(), algorithms=["RS256"], audience=TOKEN_URL
    )


# -- request parameters --------------------------------------------------------------------------


def test_scope_and_audience_parameters() -> None:
    """Requested scopes are space-joined into scope; audience is sent when configured."""
    request = cc_grant(scopes=("read", "write"), audience="https://api.example.com").build_request()
    assert form(request) == {
        "grant_type": "client_credentials",
        "scope": "read write",
        "audience": "https://api.example.com",
    }


def test_no_scope_or_audience_when_not_configured() -> None:
    """Without scopes or audience the request carries neither parameter."""
    fields = form(cc_grant().build_request())
    assert "scope" not in fields
    assert "audience" not in fields


def test_refresh_request_carries_current_refresh_token() -> None:
    """The refresh request sends grant_type=refresh_token with the grant's current token (§6)."""
    grant = rt_grant(refresh="rt-v1", scopes=["read"])
    assert form(grant.build_request()) == {
        "grant_type": "refresh_token",
        "refresh_token": "rt-v1",
        "scope": "read",
        "client_id": "app",
    }
    grant.refresh_token = Secret("rt-v2")
    assert form(grant.build_request())["refresh_token"] == "rt-v2"


def test_grant_reprs_hide_secrets() -> None:
    """Grant reprs name the provider but carry no secret, refresh token or password."""
    for grant in (cc_grant(), rt_grant(), login_grant()):
        text = repr(grant)
        for canary in (CS_CANARY, RT_CANARY, PW_CANARY):
            assert canary not in text


# -- successful replies (RFC 6749 §5.1) --------------------------------------------------------


def test_parse_success() -> None:
    """A full §5.1 reply gives the token, type, expiry from issued_at, scope and lifetime."""
    response = cc_grant().parse_response(
        ok(token_type="Bearer", expires_in=1800, scope="read write"), ISSUED
    )
    assert response.token.access_token == "at-1"
    assert response.token.token_type == "Bearer"
    assert response.token.expires_at == ISSUED + 1800
    assert response.token.scope == "read write"
    assert response.lifetime == 1800
    assert response.refresh_token is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [("bearer", "Bearer"), ("BEARER", "Bearer"), ("BeArEr", "Bearer"), (None, "Bearer")],
)
def test_token_type_is_normalised(given: str | None, expected: str) -> None:
    """token_type is case-insensitive (§5.1) and defaults to Bearer when missing."""
    fields = {} if given is None else {"token_type": given}
    assert cc_grant().parse_response(ok(**fields), ISSUED).token.token_type == expected


def test_other_token_type_kept() -> None:
    """A non-bearer token type is passed through unchanged."""
    assert cc_grant().parse_response(ok(token_type="DPoP"), ISSUED).token.token_type == "DPoP"


@pytest.mark.parametrize("bad", ["Bearer\r\nX: y", "a b", 7, "x" * 33])
def test_invalid_token_type_rejected(bad: Any) -> None:
    """A token_type that is not a short token is refused as an invalid token."""
    with pytest.raises(InvalidTokenError):
        cc_grant().parse_response(ok(token_type=bad), ISSUED)


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [
        (3600, 3600.0),
        ("3600", 3600.0),
        (" 120 ", 120.0),
        (90.5, 90.5),
        (0, 1.0),
        (-5, 1.0),
        ("-5", 1.0),
        (10**12, MAX_LIFETIME),
        (1e300, MAX_LIFETIME),
        pytest.param(10**400, MAX_LIFETIME, id="int-beyond-float"),
        pytest.param(-(10**400), 1.0, id="negative-int-beyond-float"),
        (True, 777.0),
        (False, 777.0),
        ("soon", 777.0),
        ("nan", 777.0),
        ("inf", 777.0),
        ([3600], 777.0),
        ({"s": 3600}, 777.0),
    ],
)
def test_expires_in_variations(expires_in: Any, lifetime: float) -> None:
    """expires_in: strings accepted, out-of-range clamped, bool/garbage fall back to the default."""
    grant = cc_grant(default_expires_in=777)
    response = grant.parse_response(ok(expires_in=expires_in), ISSUED)
    assert response.lifetime == lifetime
    assert response.token.expires_at == ISSUED + lifetime


def test_expires_in_missing_uses_default() -> None:
    """Without expires_in the provider's default_expires_in applies."""
    response = cc_grant(default_expires_in=600).parse_response(ok(), ISSUED)
    assert response.lifetime == 600
    assert response.token.expires_at == ISSUED + 600


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_expires_in_non_finite_json_uses_default(literal: bytes) -> None:
    """JSON NaN/Infinity (which Python's json accepts) fall back to the default."""
    body = b'{"access_token": "at-1", "expires_in": ' + literal + b"}"
    response = cc_grant(default_expires_in=777).parse_response(reply(200, body), ISSUED)
    assert response.lifetime == 777
    assert math.isfinite(response.token.expires_at)


def test_unknown_fields_ignored() -> None:
    """Fields the grant does not know about are ignored (§5.1 'MUST ignore unrecognized')."""
    response = cc_grant().parse_response(
        ok(id_token="x.y.z", nested={"a": [1, 2]}, extra=None, expires_in=60), ISSUED
    )
    assert response.token.access_token == "at-1"
    assert response.lifetime == 60


def test_non_string_scope_dropped() -> None:
    """A scope that is not a string is ignored rather than stored."""
    assert cc_grant().parse_response(ok(scope=["read"]), ISSUED).token.scope is None


def test_rotated_refresh_token_is_a_secret() -> None:
    """A refresh_token in the reply comes back wrapped in Secret and kept out of the repr."""
    response = rt_grant().parse_response(ok(refresh_token=RT_CANARY + "-v2"), ISSUED)
    assert isinstance(response.refresh_token, Secret)
    assert response.refresh_token.reveal() == RT_CANARY + "-v2"
    assert RT_CANARY not in repr(response)
    assert "at-1" not in repr(response)


def test_refresh_reply_without_refresh_token() -> None:
    """A refresh reply without refresh_token yields None (the caller keeps the old one)."""
    assert rt_grant().parse_response(ok(), ISSUED).refresh_token is None


def test_missing_access_token_is_unavailable() -> None:
    """A 2xx without an access_token is a malformed reply (retryable), not a token."""
    body = {"token_type": "Bearer", "expires_in": 3600, "refresh_token": RT_CANARY}
    with pytest.raises(ProviderUnavailableError) as info:
        rt_grant().parse_response(reply(200, body), ISSUED)
    assert type(info.value) is ProviderUnavailableError
    assert info.value.status_code == 200
    assert RT_CANARY not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"<html>oops</html>",
        b"",
        b'{"access_token": "at-1"',
        b'["access_token", "at-1"]',
        b'"at-1"',
        b"\xff\xfe\x00",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_malformed_2xx_is_unavailable(content: bytes) -> None:
    """A 2xx that is not a JSON object (HTML, truncated, array, deep nesting) is retryable."""
    with pytest.raises(ProviderUnavailableError) as info:
        cc_grant().parse_response(Reply(200, httpx.Headers(), content), ISSUED)
    assert not isinstance(info.value, InvalidTokenError)
    assert "at-1" not in str(info.value)


def test_malformed_2xx_message_has_no_body() -> None:
    """The malformed-reply error does not quote the body, which may hold a refresh token."""
    body = f"not json but contains {RT_CANARY}".encode()
    with pytest.raises(ProviderUnavailableError) as info:
        rt_grant().parse_response(Reply(200, httpx.Headers(), body), ISSUED)
    assert RT_CANARY not in str(info.value)
    assert RT_CANARY not in repr(info.value)


BAD_TOKENS = [
    "abc\rdef",
    "abc\ndef",
    "abc\r\nSet-Cookie: x=y",
    "abc\x00def",
    "abc def",
    "abc\tdef",
    "tökén",
    "abc\x7f",
    "",
    pytest.param("x" * 16385, id="too-long"),
]


@pytest.mark.parametrize("value", BAD_TOKENS)
def test_bad_access_token_rejected(value: str) -> None:
    """An access token with CR, LF, NUL, space, non-ASCII or bad length is refused (C3)."""
    with pytest.raises(InvalidTokenError) as info:
        cc_grant().parse_response(reply(200, {"access_token": value}), ISSUED)
    if value:
        assert value not in str(info.value)
    assert "access_token" in str(info.value)


@pytest.mark.parametrize("value", [v for v in BAD_TOKENS if v])
def test_bad_refresh_token_rejected(value: str) -> None:
    """A refresh token that is not a safe header value is refused and not echoed (C3)."""
    bad = RT_CANARY + value
    with pytest.raises(InvalidTokenError) as info:
        rt_grant().parse_response(ok(refresh_token=bad), ISSUED)
    assert RT_CANARY not in str(info.value)
    assert RT_CANARY not in repr(info.value)


@pytest.mark.parametrize("value", [None, 123, ["at"], {"v": "at"}, True])
def test_non_string_access_token_rejected(value: Any) -> None:
    """A non-string access_token is refused as an invalid token."""
    with pytest.raises(InvalidTokenError):
        cc_grant().parse_response(reply(200, {"access_token": value}), ISSUED)


def test_longest_allowed_token_accepted() -> None:
    """A 16384-character visible-ASCII token is still accepted (boundary of the size rule)."""
    value = "A" * 16384
    assert cc_grant().parse_response(ok(access_token=value), ISSUED).token.access_token == value


# -- error classification (RFC 6749 §5.2) ------------------------------------------------------

CLASSIFICATION = [
    # (grant, status, error code, expected class)
    ("cc", 401, None, ClientAuthenticationError),
    ("cc", 403, None, ClientAuthenticationError),
    ("cc", 401, "invalid_client", ClientAuthenticationError),
    ("cc", 400, "invalid_client", ClientAuthenticationError),
    ("cc", 400, "invalid_grant", ProviderMisconfiguredError),
    ("cc", 400, "invalid_scope", ProviderMisconfiguredError),
    ("cc", 400, "unsupported_grant_type", ProviderMisconfiguredError),
    ("cc", 400, None, ProviderMisconfiguredError),
    ("cc", 404, None, ProviderMisconfiguredError),
    ("cc", 405, None, ProviderMisconfiguredError),
    ("cc", 429, None, ProviderUnavailableError),
    ("cc", 500, None, ProviderUnavailableError),
    ("cc", 502, None, ProviderUnavailableError),
    ("cc", 503, "temporarily_unavailable", ProviderUnavailableError),
    ("cc", 504, None, ProviderUnavailableError),
    ("rt", 400, "invalid_grant", ReauthorizationRequiredError),
    ("rt", 401, "invalid_grant", ReauthorizationRequiredError),
    ("rt", 401, "login_required", ReauthorizationRequiredError),
    ("rt", 400, "login_required", ReauthorizationRequiredError),
    ("rt", 400, "invalid_client", ClientAuthenticationError),
    ("rt", 401, "invalid_client", ClientAuthenticationError),
    ("rt", 401, None, ClientAuthenticationError),
    ("rt", 400, "invalid_request", ProviderMisconfiguredError),
    ("rt", 500, "invalid_grant", ProviderUnavailableError),
    ("rt", 429, None, ProviderUnavailableError),
]


@pytest.mark.parametrize(("kind", "status", "code", "expected"), CLASSIFICATION)
def test_error_classification(
    kind: str, status: int, code: str | None, expected: type[ProviderError]
) -> None:
    """Each (grant, status, error) maps to exactly one error class with the right retry flag."""
    grant = cc_grant() if kind == "cc" else rt_grant()
    body = {"error": code} if code else {}
    with pytest.raises(ProviderError) as info:
        grant.parse_response(reply(status, body), ISSUED)
    error = info.value
    assert type(error) is expected
    assert error.retryable is (expected is ProviderUnavailableError)
    assert error.status_code == status
    assert error.error_code == code
    assert error.provider == "idp"
    assert str(status) in str(error)


def test_reauthorization_errors_are_configurable() -> None:
    """Only the codes listed in reauthorization_errors mean 'authorise again'."""
    grant = rt_grant(reauthorization_errors=["invalid_grant"])
    with pytest.raises(ProviderMisconfiguredError) as info:
        grant.parse_response(reply(401, {"error": "login_required"}), ISSUED)
    assert type(info.value) is ClientAuthenticationError
    with pytest.raises(ReauthorizationRequiredError):
        grant.parse_response(reply(400, {"error": "invalid_grant"}), ISSUED)


def test_error_description_never_in_message() -> None:
    """error_description, error_uri and any body text stay out of the exception (D12)."""
    body = {
        "error": "invalid_grant",
        "error_description": f"refresh token {RT_CANARY} {DESC_CANARY} revoked",
        "error_uri": f"https://idp.example.com/{DESC_CANARY}",
    }
    for status in (400, 401, 500):
        with pytest.raises(ProviderError) as info:
            rt_grant().parse_response(reply(status, body), ISSUED)
        for text in (str(info.value), repr(info.value), str(vars(info.value))):
            assert DESC_CANARY not in text
            assert RT_CANARY not in text
        assert info.value.error_code == "invalid_grant"


@pytest.mark.parametrize(
    "code",
    [
        "invalid_grant\r\nX-Injected: 1",
        "bad\ncode",
        "nul\x00",
        'quote"',
        "back\\slash",
        "x" * 65,
        "é",
        "",
        42,
        ["invalid_grant"],
    ],
)
def test_malformed_error_code_dropped(code: Any) -> None:
    """An error code outside RFC 6749's charset or over 64 chars is dropped, not echoed."""
    with pytest.raises(ProviderError) as info:
        rt_grant().parse_response(reply(400, {"error": code}), ISSUED)
    assert info.value.error_code is None
    assert type(info.value) is ProviderMisconfiguredError
    if isinstance(code, str) and len(code) > 3:
        assert code not in str(info.value)
    assert "\n" not in str(info.value)
    assert "\r" not in str(info.value)


def test_unknown_error_code_hidden() -> None:
    """A well-formed but unregistered error code (it could be a token) is neither kept nor shown."""
    code = "e" * 64
    with pytest.raises(ProviderError) as info:
        cc_grant().parse_response(reply(400, {"error": code}), ISSUED)
    assert type(info.value) is ProviderMisconfiguredError
    assert info.value.error_code is None
    assert code not in str(info.value)


def test_error_with_non_json_body() -> None:
    """A 4xx or 5xx with an HTML body is still classified by status alone."""
    page = Reply(401, httpx.Headers(), b"<html>Unauthorized</html>")
    with pytest.raises(ClientAuthenticationError) as info:
        cc_grant().parse_response(page, ISSUED)
    assert info.value.error_code is None
    with pytest.raises(ProviderUnavailableError):
        cc_grant().parse_response(Reply(502, httpx.Headers(), b"<html>Bad gateway</html>"), ISSUED)


# -- Retry-After (RFC 9110 §10.2.3) ----------------------------------------------------------


def unavailable(status: int, retry_after: str | bytes | None) -> ProviderUnavailableError:
    """The error parse_response raises for ``status`` with the given Retry-After header."""
    headers = httpx.Headers()
    if retry_after is not None:
        raw = retry_after if isinstance(retry_after, bytes) else retry_after.encode()
        headers = httpx.Headers([(b"Retry-After", raw)])
    with pytest.raises(ProviderUnavailableError) as info:
        cc_grant().parse_response(Reply(status, headers, b"{}"), ISSUED)
    return info.value


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds(status: int) -> None:
    """Retry-After in delta-seconds is carried on the error."""
    assert unavailable(status, "120").retry_after == 120.0
    assert unavailable(status, " 0 ").retry_after == 0.0


def test_retry_after_http_date() -> None:
    """Retry-After as an HTTP-date becomes the seconds from now until then."""
    error = unavailable(503, formatdate(time.time() + 120, usegmt=True))
    assert error.retry_after is not None
    assert 115 <= error.retry_after <= 121


def test_retry_after_date_in_the_past_is_zero() -> None:
    """An HTTP-date in the past means 'retry now', never a negative delay."""
    assert unavailable(503, "Wed, 21 Oct 2015 07:28:00 GMT").retry_after == 0.0


@pytest.mark.parametrize(
    "value",
    [
        "soon",
        "1.5",
        "-1",
        "",
        "120 seconds",
        "Wed, 31 Feb 2015 07:28:00 GMT",
        "Wed, 21 Oct 99999999999999999999 07:28:00 GMT",
        b"\xb2",
        b"\xc2\xb2",
        b"1\xc2\xb2",
    ],
)
def test_invalid_retry_after_is_none(value: str | bytes) -> None:
    """A Retry-After that is neither delta-seconds nor an HTTP-date is ignored (None)."""
    assert unavailable(503, value).retry_after is None


def test_no_retry_after_is_none() -> None:
    """Without the header retry_after is None."""
    assert unavailable(503, None).retry_after is None


def test_retry_after_ignored_on_4xx() -> None:
    """A non-retryable error carries no retry_after attribute value to act on."""
    with pytest.raises(ProviderMisconfiguredError) as info:
        cc_grant().parse_response(reply(400, {}, {"Retry-After": "5"}), ISSUED)
    assert getattr(info.value, "retry_after", None) is None


# -- login grant -----------------------------------------------------------------------------


def test_login_json_template_filled() -> None:
    """The default JSON template posts the username and the revealed password."""
    request = login_grant().build_request()
    assert request.method == "POST"
    assert str(request.url) == LOGIN_URL
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"username": "alice", "password": PW_CANARY}


def test_login_nested_json_template_filled() -> None:
    """Placeholders are filled anywhere in a nested JSON template; other values are kept."""
    template = {
        "auth": {"user": "{username}", "secret": "pw={password}", "ids": ["{username}", 7]},
        "remember": True,
    }
    request = login_grant(request={"json": template}).build_request()
    assert json.loads(request.content) == {
        "auth": {"user": "alice", "secret": f"pw={PW_CANARY}", "ids": ["alice", 7]},
        "remember": True,
    }


def test_login_form_template_filled() -> None:
    """A form template is sent form-encoded with the placeholders filled."""
    request = login_grant(
        request={"form": {"user": "{username}", "pass": "{password}", "mode": "api"}}
    ).build_request()
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert form(request) == {"user": "alice", "pass": PW_CANARY, "mode": "api"}


def test_login_password_with_placeholder_text_is_literal() -> None:
    """A password containing '{username}' is sent literally, not substituted again."""
    settings = login_settings()
    grant = LoginGrant(
        "db", settings, Credential(username="alice", password=Secret("{username}&{password}"))
    )
    assert json.loads(grant.build_request().content)["password"] == "{username}&{password}"


def test_login_token_path_with_list_index() -> None:
    """A dotted token_path walks objects and list indexes; expires_in_path sets the lifetime."""
    grant = login_grant(token_path="data.tokens.1.value", expires_in_path="data.ttl")
    body = {"data": {"tokens": [{"value": "first"}, {"value": "second"}], "ttl": "90"}}
    response = grant.parse_response(reply(200, body), ISSUED)
    assert response.token.access_token == "second"
    assert response.token.token_type == "Bearer"
    assert response.lifetime == 90
    assert response.token.expires_at == ISSUED + 90
    assert response.refresh_token is None


def test_login_ttl_default_and_bad_expires_in() -> None:
    """Without expires_in_path, or with a bad value there, ttl_seconds applies."""
    plain = login_grant(ttl_seconds=300).parse_response(reply(200, {"token": "t"}), ISSUED)
    assert plain.lifetime == 300
    bad = login_grant(ttl_seconds=300, expires_in_path="ttl").parse_response(
        reply(200, {"token": "t", "ttl": "later"}), ISSUED
    )
    assert bad.lifetime == 300


def test_login_token_type_normalised() -> None:
    """The configured token_type is normalised like an OAuth one."""
    response = login_grant(token_type="bearer").parse_response(reply(200, {"token": "t"}), ISSUED)
    assert response.token.token_type == "Bearer"


@pytest.mark.parametrize("status", [401, 403])
def test_login_wrong_password(status: int) -> None:
    """401/403 from the login endpoint is a client-authentication error that hides the password."""
    with pytest.raises(ClientAuthenticationError) as info:
        login_grant().parse_response(reply(status, {"message": PW_CANARY}), ISSUED)
    assert info.value.status_code == status
    assert PW_CANARY not in str(info.value)
    assert "alice" in str(info.value)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (500, ProviderUnavailableError),
        (429, ProviderUnavailableError),
        (404, ProviderMisconfiguredError),
    ],
)
def test_login_other_statuses(status: int, expected: type[ProviderError]) -> None:
    """5xx/429 from the login endpoint are retryable; other 4xx are misconfiguration."""
    with pytest.raises(ProviderError) as info:
        login_grant().parse_response(reply(status, {}, {"Retry-After": "3"}), ISSUED)
    assert type(info.value) is expected
    if expected is ProviderUnavailableError:
        assert info.value.retry_after == 3.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "body",
    [{"data": {}}, {"token": None}, {}, b"not json", b"[1, 2]", {"data": {"tokens": []}}],
)
def test_login_missing_token(body: Any) -> None:
    """A 2xx without a token at token_path is a malformed (retryable) reply."""
    grant = login_grant(token_path="data.tokens.0.value")
    with pytest.raises(ProviderUnavailableError) as info:
        grant.parse_response(reply(200, body), ISSUED)
    assert not isinstance(info.value, InvalidTokenError)


@pytest.mark.parametrize("value", ["a\r\nb", "a b", "tök", 12345])
def test_login_bad_token_rejected(value: Any) -> None:
    """A login token that is not a safe header value is refused."""
    with pytest.raises(InvalidTokenError):
        login_grant().parse_response(reply(200, {"token": value}), ISSUED)


# -- fuzz ------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TOKEN_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "access_token": JSON | st.text(max_size=30),
        "token_type": JSON,
        "expires_in": JSON | st.integers(min_value=-(10**400), max_value=10**400),
        "refresh_token": JSON,
        "scope": JSON,
        "error": JSON | st.text(max_size=70),
        "error_description": JSON,
    },
)


@settings(max_examples=200, deadline=None, database=None)
@given(
    status=st.sampled_from([200, 201, 204, 400, 401, 403, 404, 429, 500, 503]),
    body=TOKEN_FIELDS,
    raw=st.binary(max_size=40),
    retry_after=st.binary(max_size=40),
    use_raw=st.booleans(),
)
def test_parser_only_raises_provider_errors(
    status: int, body: dict[str, Any], raw: bytes, retry_after: bytes, use_raw: bool
) -> None:
    """Any reply body and Retry-After header yields a TokenResponse or a ProviderError, nothing else."""
    content = raw if use_raw else json.dumps(body).encode()
    headers = httpx.Headers([(b"Retry-After", retry_after.replace(b"\r", b"").replace(b"\n", b""))])
    for grant in (cc_grant(), rt_grant()):
        try:
            result = grant.parse_response(Reply(status, headers, content), ISSUED)
        except ProviderError as error:
            assert RT_CANARY not in str(error)
        else:
            assert isinstance(result, TokenResponse)
            assert 1.0 <= result.lifetime <= MAX_LIFETIME
