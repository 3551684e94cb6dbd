"""The retry flow and its driver, with faults injected at the httpx transport boundary."""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tokenbroker.config import ClientCredentialsProvider, RefreshTokenProvider
from tokenbroker.core.secret import Secret
from tokenbroker.errors import (
    ClientAuthenticationError,
    ProviderError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
)
from tokenbroker.grants import (
    ClientCredentialsGrant,
    Exchange,
    Grant,
    RefreshTokenGrant,
    Reply,
    RetryPolicy,
    Sleep,
    TokenResponse,
    send_sync,
    token_flow,
)

TOKEN_URL = "https://idp.example.com/oauth2/token"
RT_CANARY = "CANARY_RT_d00d1e55"
URL_CANARY = "CANARY_URL_6a7b8c9d"
FAST = RetryPolicy(retries=2, timeout=2.0, deadline=10.0, backoff=0.01, max_response_bytes=4096)

Outcome = Callable[[httpx.Request], httpx.Response]


def respond(status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> Outcome:
    """An outcome answering ``status`` with a JSON (or raw bytes) body."""
    if body is None and status == 200:
        body = {"access_token": "at-1", "token_type": "Bearer", "expires_in": 3600}
    content = body if isinstance(body, bytes) else json.dumps(body or {}).encode()

    def outcome(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, content=content)

    return outcome


def fail(exc_type: type[httpx.TransportError], message: str = "failed") -> Outcome:
    """An outcome where the transport raises ``exc_type`` (no reply at all)."""

    def outcome(request: httpx.Request) -> httpx.Response:
        raise exc_type(message, request=request)

    return outcome


class Script:
    """A scripted token endpoint: attempt n gets outcomes[n] (the last repeats); records requests."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = outcomes
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        return self.outcomes[min(len(self.requests), len(self.outcomes)) - 1](request)

    @property
    def attempts(self) -> int:
        """How many requests reached the endpoint."""
        return len(self.requests)


def run(
    script: Script,
    grant: Grant,
    policy: RetryPolicy = FAST,
    handler: Any = None,
) -> TokenResponse:
    """Drive one token exchange through the driver against ``script``."""
    return exchange(script, grant, policy, handler).result()


def exchange(
    script: Script,
    grant: Grant,
    policy: RetryPolicy = FAST,
    handler: Any = None,
) -> Exchange:
    """Drive one token exchange and return how it ended (the driver never raises its error)."""
    flow = token_flow(grant, policy, random.Random(1234))
    with httpx.Client(transport=httpx.MockTransport(handler or script)) as client:
        return send_sync(client, flow, policy.max_response_bytes)


def run_error(
    script: Script, grant: Grant, policy: RetryPolicy = FAST, handler: Any = None
) -> ProviderError:
    """Like :func:`run` but the exchange must fail; returns the error."""
    with pytest.raises(ProviderError) as info:
        run(script, grant, policy, handler)
    return info.value


def cc_grant(**overrides: Any) -> ClientCredentialsGrant:
    """A client-credentials grant for provider ``idp``."""
    settings = ClientCredentialsProvider.model_validate(
        {
            "grant": "client_credentials",
            "token_url": TOKEN_URL,
            "client_id": "svc",
            "client_secret": "svc-secret",
            **overrides,
        }
    )
    return ClientCredentialsGrant("idp", settings, ())


def rt_grant() -> RefreshTokenGrant:
    """A refresh-token grant holding the refresh-token canary."""
    settings = RefreshTokenProvider.model_validate(
        {"grant": "refresh_token", "token_url": TOKEN_URL, "client_id": "app", "refresh_token": "x"}
    )
    return RefreshTokenGrant("idp", settings, Secret(RT_CANARY))


def form(request: httpx.Request) -> dict[str, str]:
    """The request's form fields."""
    return dict(parse_qsl(request.content.decode("ascii")))


def policy(**changes: Any) -> RetryPolicy:
    """FAST with ``changes``."""
    fields = {
        "retries": FAST.retries,
        "timeout": FAST.timeout,
        "deadline": FAST.deadline,
        "backoff": FAST.backoff,
        "max_response_bytes": FAST.max_response_bytes,
        **changes,
    }
    return RetryPolicy(**fields)


# -- success and retryable failures ----------------------------------------------------------


def test_success_on_first_attempt() -> None:
    """A 200 is parsed into a token after exactly one request."""
    script = Script(respond(200))
    response = run(script, cc_grant())
    assert response.token.access_token == "at-1"
    assert script.attempts == 1


def test_5xx_then_success() -> None:
    """Two 5xx replies are retried and the third attempt's token is returned."""
    script = Script(respond(500), respond(502), respond(200))
    assert run(script, cc_grant()).token.access_token == "at-1"
    assert script.attempts == 3


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
@pytest.mark.parametrize("retries", [0, 1, 3])
def test_retryable_status_exhausts_retries(status: int, retries: int) -> None:
    """A provider that keeps failing is asked exactly retries+1 times, then the error is raised."""
    script = Script(respond(status))
    error = run_error(script, cc_grant(), policy(retries=retries))
    assert type(error) is ProviderUnavailableError
    assert error.status_code == status
    assert script.attempts == retries + 1


def test_malformed_200_is_retried() -> None:
    """A 200 that is not a JSON object is retried like a 5xx (A5)."""
    script = Script(respond(200, b"<html>maintenance</html>"))
    error = run_error(script, cc_grant())
    assert type(error) is ProviderUnavailableError
    assert script.attempts == FAST.retries + 1


def test_last_unusable_2xx_reply_is_kept_in_the_exchange_not_on_the_error() -> None:
    """The latest 2xx body without a usable token is kept in the exchange record (for the
    refresh protocol), even when a later attempt failed otherwise; the error itself has no
    traceback, no chain and no attribute holding it; a plain 5xx keeps none."""
    body = b'{"refresh_token": "CANARY_RT_in_the_reply"}'
    script = Script(respond(200, body), respond(503, {}))
    ended = exchange(script, cc_grant())
    assert ended.unusable_reply == body
    assert ended.doubtful_sends == FAST.retries + 1
    error = ended.error
    assert isinstance(error, ProviderUnavailableError)
    assert error.__traceback__ is None and error.__cause__ is None and error.__context__ is None
    assert b"CANARY" not in repr(vars(error)).encode() and "CANARY" not in repr(ended)
    assert exchange(Script(respond(503, {})), cc_grant()).unusable_reply is None


@pytest.mark.parametrize(
    ("make_grant", "status", "body", "expected"),
    [
        (cc_grant, 400, {"error": "invalid_client"}, ClientAuthenticationError),
        (cc_grant, 401, {"error": "invalid_client"}, ClientAuthenticationError),
        (cc_grant, 403, {}, ClientAuthenticationError),
        (cc_grant, 400, {"error": "invalid_scope"}, ProviderMisconfiguredError),
        (cc_grant, 404, {}, ProviderMisconfiguredError),
        (rt_grant, 400, {"error": "invalid_grant"}, ReauthorizationRequiredError),
        (rt_grant, 401, {"error": "login_required"}, ReauthorizationRequiredError),
        (rt_grant, 401, {"error": "invalid_client"}, ClientAuthenticationError),
    ],
)
def test_non_retryable_errors_make_one_attempt(
    make_grant: Callable[[], Grant],
    status: int,
    body: dict[str, str],
    expected: type[ProviderError],
) -> None:
    """4xx, invalid_client and invalid_grant are never retried: exactly one request (A7, A8)."""
    script = Script(respond(status, body))
    error = run_error(script, make_grant(), policy(retries=5))
    assert type(error) is expected
    assert script.attempts == 1


def test_non_retryable_after_retryable() -> None:
    """A 503 is retried, but the invalid_grant that follows stops the loop at once."""
    script = Script(respond(503), respond(400, {"error": "invalid_grant"}), respond(200))
    error = run_error(script, rt_grant(), policy(retries=5))
    assert type(error) is ReauthorizationRequiredError
    assert script.attempts == 2


# -- transport failures ------------------------------------------------------------------------


@pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ConnectTimeout])
def test_connection_failures_retried_and_marked_unsent(
    exc_type: type[httpx.TransportError],
) -> None:
    """Refused connections are retried; the final error says the request was never sent (A3)."""
    script = Script(fail(exc_type, f"cannot reach https://idp/?k={URL_CANARY}"))
    error = run_error(script, rt_grant())
    assert isinstance(error, ProviderUnavailableError)
    assert error.sent is False
    assert script.attempts == FAST.retries + 1
    assert URL_CANARY not in str(error)
    assert {form(r)["refresh_token"] for r in script.requests} == {RT_CANARY}


def test_connect_error_then_success() -> None:
    """After a refused connection the next attempt succeeds."""
    script = Script(fail(httpx.ConnectError), respond(200))
    assert run(script, cc_grant()).token.access_token == "at-1"
    assert script.attempts == 2


@pytest.mark.parametrize(
    "exc_type", [httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.RemoteProtocolError]
)
def test_failures_after_sending_retried_and_marked_sent(
    exc_type: type[httpx.TransportError],
) -> None:
    """Timeouts and broken replies are retried; the error says the request may have arrived."""
    script = Script(fail(exc_type, f"boom {URL_CANARY}"))
    error = run_error(script, cc_grant())
    assert isinstance(error, ProviderUnavailableError)
    assert error.sent is True
    assert script.attempts == FAST.retries + 1
    assert URL_CANARY not in str(error)


def test_error_has_no_body_or_token_material() -> None:
    """The final error quotes neither the reply body nor the refresh token (D1)."""
    body = {"error": "server_error", "error_description": f"rt {RT_CANARY} broke"}
    error = run_error(Script(respond(500, body)), rt_grant())
    for text in (str(error), repr(error), str(vars(error))):
        assert RT_CANARY not in text


# -- Retry-After and the overall deadline --------------------------------------------------


def test_retry_after_is_honoured() -> None:
    """The next attempt waits at least the Retry-After delay even when the backoff is zero (A9)."""
    script = Script(respond(503, {}, {"Retry-After": "1"}), respond(200))
    response = run(script, cc_grant(), policy(retries=1, backoff=0.0, deadline=5.0))
    assert response.token.access_token == "at-1"
    assert script.attempts == 2
    assert script.times[1] - script.times[0] >= 0.99


@pytest.mark.parametrize("header", ["120", "HTTP-DATE"])
def test_retry_after_beyond_deadline_gives_up_at_once(header: str) -> None:
    """A Retry-After longer than the remaining deadline ends the exchange now, carrying the delay."""
    value = formatdate(time.time() + 120, usegmt=True) if header == "HTTP-DATE" else header
    script = Script(respond(429, {}, {"Retry-After": value}))
    started = time.monotonic()
    error = run_error(script, cc_grant(), policy(retries=5, deadline=5.0))
    elapsed = time.monotonic() - started
    assert isinstance(error, ProviderUnavailableError)
    assert script.attempts == 1
    assert elapsed < 0.5
    assert error.status_code == 429
    assert error.retry_after is not None
    assert 115 <= error.retry_after <= 120


def test_overall_deadline_bounds_retries() -> None:
    """With many retries allowed, the exchange still ends within the overall deadline (A4)."""
    script = Script(respond(503))
    deadline = 0.6
    started = time.monotonic()
    error = run_error(script, cc_grant(), policy(retries=10, backoff=0.2, deadline=deadline))
    elapsed = time.monotonic() - started
    assert isinstance(error, ProviderUnavailableError)
    assert elapsed <= deadline + 0.15
    assert 2 <= script.attempts < 11


def trickle(chunks: int, pause: float) -> Iterator[bytes]:
    """A body that arrives one byte at a time (slowloris)."""
    yield b'{"access_token": "at-1", "pad": "'
    for _ in range(chunks):
        time.sleep(pause)
        yield b"x"
    yield b'"}'


def test_trickling_reply_bounded_by_attempt_timeout() -> None:
    """A body trickling in slower than the attempt timeout is abandoned well before it ends (A4)."""
    attempts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(time.monotonic())
        return httpx.Response(200, content=trickle(100, 0.05))

    started = time.monotonic()
    error = run_error(
        Script(), cc_grant(), policy(timeout=0.3, retries=0, deadline=5.0), handler=handler
    )
    elapsed = time.monotonic() - started
    assert isinstance(error, ProviderUnavailableError)
    assert len(attempts) == 1
    assert elapsed < 1.5


# -- size cap --------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid token reply of exactly ``size`` bytes."""
    head, tail = b'{"access_token": "at-1", "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_reply_at_the_cap_is_accepted() -> None:
    """A reply of exactly max_response_bytes is read and parsed."""
    script = Script(respond(200, padded(FAST.max_response_bytes)))
    assert run(script, cc_grant()).token.access_token == "at-1"


def test_reply_over_the_cap_is_refused() -> None:
    """A reply one byte over max_response_bytes is refused without being parsed (A10)."""
    script = Script(respond(200, padded(FAST.max_response_bytes + 1)))
    error = run_error(script, cc_grant(), policy(retries=0))
    assert type(error) is ProviderUnavailableError
    assert "size" in str(error)
    assert script.attempts == 1


def test_huge_error_reply_is_refused() -> None:
    """A large error page is refused at the cap too, not read whole."""
    script = Script(respond(500, b"E" * (1 << 20)))
    error = run_error(script, cc_grant(), policy(retries=0))
    assert "size" in str(error)


def test_gzip_bomb_refused_by_decompressed_size() -> None:
    """A small gzip body that inflates past max_response_bytes is refused (A10)."""
    bomb = gzip.compress(padded(8 << 20))
    cap = 64 * 1024
    assert len(bomb) < cap
    script = Script(respond(200, bomb, {"Content-Encoding": "gzip"}))
    error = run_error(script, cc_grant(), policy(retries=0, max_response_bytes=cap))
    assert type(error) is ProviderUnavailableError
    assert "size" in str(error)


def test_small_gzip_reply_is_decoded() -> None:
    """A gzip reply under the cap is decompressed and parsed normally."""
    body = gzip.compress(padded(2000))
    script = Script(respond(200, body, {"Content-Encoding": "gzip"}))
    assert run(script, cc_grant()).token.access_token == "at-1"


# -- private_key_jwt across retries ------------------------------------------------------------


def test_private_key_jwt_fresh_jti_on_each_attempt() -> None:
    """Every retry carries a newly signed assertion with a distinct jti (RFC 7523 §3)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    grant = cc_grant(client_auth="private_key_jwt", client_secret=None, private_key=private_pem)
    script = Script(respond(503), respond(503), respond(200))
    run(script, grant)
    assert script.attempts == 3
    jtis = [
        jwt.decode(
            form(r)["client_assertion"], key.public_key(), algorithms=["ES256"], audience=TOKEN_URL
        )["jti"]
        for r in script.requests
    ]
    assert len(set(jtis)) == 3


# -- the policy without I/O -------------------------------------------------------------------


def unavailable(retry_after: str | None = None) -> Reply:
    """A 503 reply, optionally with Retry-After."""
    headers = httpx.Headers({"Retry-After": retry_after} if retry_after else {})
    return Reply(503, headers, b"{}")


def test_backoff_is_exponential_with_full_jitter() -> None:
    """Sleeps are uniform(0, backoff*2^(n-1)) from the injected RNG, then the error is raised."""
    seed, backoff = 99, 0.5
    flow = token_flow(
        cc_grant(), policy(retries=4, backoff=backoff, deadline=600.0), random.Random(seed)
    )
    expected = random.Random(seed)
    item = next(flow)
    sleeps: list[float] = []
    with pytest.raises(StopIteration) as stop:
        while True:
            assert isinstance(item, httpx.Request)
            step = flow.send(unavailable())
            assert isinstance(step, Sleep)
            sleeps.append(step.seconds)
            item = flow.send(None)
    assert isinstance(stop.value.value.error, ProviderUnavailableError)
    assert sleeps == [expected.uniform(0, backoff * 2**n) for n in range(4)]


def test_backoff_is_capped() -> None:
    """No single backoff sleep exceeds 30 s however many attempts have failed."""
    flow = token_flow(
        cc_grant(), policy(retries=10, backoff=20.0, deadline=10_000.0), random.Random(5)
    )
    item = next(flow)
    sleeps = []
    for _ in range(10):
        assert isinstance(item, httpx.Request)
        step = flow.send(unavailable())
        assert isinstance(step, Sleep)
        sleeps.append(step.seconds)
        item = flow.send(None)
    assert max(sleeps) <= 30.0
    flow.close()


def test_retry_after_overrides_shorter_jitter() -> None:
    """Retry-After sets the sleep when it is longer than the jittered backoff."""
    flow = token_flow(cc_grant(), policy(backoff=0.1, deadline=60.0), random.Random(1))
    next(flow)
    step = flow.send(unavailable("7"))
    assert step == Sleep(7.0)
    flow.close()


def test_attempt_timeout_never_exceeds_deadline() -> None:
    """Each request's httpx timeout is capped by the remaining overall deadline."""
    flow = token_flow(cc_grant(), policy(timeout=10.0, deadline=2.0), random.Random(1))
    request = next(flow)
    assert isinstance(request, httpx.Request)
    timeouts = request.extensions["timeout"]
    assert set(timeouts) == {"connect", "read", "write", "pool"}
    assert all(0 < value <= 2.0 for value in timeouts.values())
    flow.close()


def test_flow_returns_the_parsed_token() -> None:
    """Sending a 200 reply ends the generator with the TokenResponse as its value."""
    flow = token_flow(cc_grant(), FAST, random.Random(1))
    next(flow)
    with pytest.raises(StopIteration) as stop:
        flow.send(Reply(200, httpx.Headers(), b'{"access_token": "at-9"}'))
    assert stop.value.value.result().token.access_token == "at-9"


def test_flow_deadlines_and_issued_at_follow_the_injected_clock() -> None:
    """The attempt deadline, the overall deadline and ``issued_at`` are readings of the
    injected clock: a retry is dropped once the ManualClock passes the deadline, and a
    token's ``expires_at`` counts from the clock's wall time."""
    from tokenbroker.core.clock import ManualClock

    clock = ManualClock()
    policy = RetryPolicy(retries=5, timeout=2.0, deadline=10.0, backoff=0.01)
    flow = token_flow(cc_grant(), policy, random.Random(1), clock=clock)
    first = next(flow)
    assert isinstance(first, httpx.Request)
    assert first.extensions["tokenbroker.attempt_deadline"] == clock.monotonic() + 2.0
    clock.advance(10.0)  # the whole deadline passes while the first attempt fails
    with pytest.raises(StopIteration) as stop:
        flow.send(ProviderUnavailableError("idp: down", provider="idp"))
    assert isinstance(stop.value.value.error, ProviderUnavailableError)

    flow = token_flow(cc_grant(), policy, random.Random(1), clock=clock)
    next(flow)
    body = json.dumps({"access_token": "at", "token_type": "Bearer", "expires_in": 60}).encode()
    with pytest.raises(StopIteration) as stop:
        flow.send(Reply(200, httpx.Headers({"content-type": "application/json"}), body))
    assert stop.value.value.result().token.expires_at == clock.time() + 60


def test_driver_sleeps_and_checks_bodies_with_what_it_is_given() -> None:
    """The driver's retry pauses go to the injected sleep (a ManualClock's: no real wait) and a
    body is judged slow by the injected clock, the one the flow stamped its deadline with."""
    from tokenbroker.core.clock import ManualClock

    clock = ManualClock()
    policy = RetryPolicy(retries=3, timeout=2.0, deadline=600.0, backoff=100.0)
    script = Script(respond(503), respond())
    started = time.monotonic()
    flow = token_flow(cc_grant(), policy, random.Random(1), clock=clock)
    with httpx.Client(transport=httpx.MockTransport(script)) as client:
        result = send_sync(client, flow, 4096, clock=clock, sleep=clock.sleep).result()
    assert result.token.access_token == "at-1"
    assert script.attempts == 2
    assert clock.monotonic() > 0  # the backoff was slept on the fake clock
    assert time.monotonic() - started < 5.0

    def slow_body(request: httpx.Request) -> httpx.Response:
        def chunks() -> Iterator[bytes]:
            yield b'{"access_token": "at", '
            clock.advance(3.0)  # past the 2 s attempt deadline, on the injected clock only
            yield b'"token_type": "Bearer", "expires_in": 60}'

        return httpx.Response(200, content=chunks())

    flow = token_flow(cc_grant(), RetryPolicy(retries=0, timeout=2.0), clock=clock)
    with httpx.Client(transport=httpx.MockTransport(slow_body)) as client:
        error = send_sync(client, flow, 4096, clock=clock, sleep=clock.sleep).error
    assert isinstance(error, ProviderUnavailableError)
    assert "too slow" in str(error)


def test_one_log_line_per_token_request_attempt_never_a_body(
    make_broker: Any, auth_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Against the real authorization server, a 503 then a 200 give exactly two
    ``tokenbroker.grants`` lines (provider, attempt, status, elapsed ms, outcome, the delay
    before the next attempt); no line or record field holds the reply body, the token or
    the client secret."""
    from support import CLIENT_SECRET
    from tokenbroker.testing import Fault

    canary = "body-canary-5f1c"
    auth_server.inject(Fault(status=503, body=json.dumps({"error": canary})), times=1)
    caplog.set_level(logging.DEBUG, logger="tokenbroker")
    token = make_broker().get_token("svc").access_token
    lines = [r for r in caplog.records if r.name == "tokenbroker.grants"]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]
    first, second = (r.getMessage() for r in lines)
    assert re.fullmatch(
        r"token request provider=svc attempt=1 status=503 elapsed_ms=[0-9.]+"
        r" outcome=ProviderUnavailableError next_delay=[0-9.]+s",
        first,
    ), first
    assert re.fullmatch(
        r"token request provider=svc attempt=2 status=200 elapsed_ms=[0-9.]+"
        r" outcome=ok next_delay=none",
        second,
    ), second
    fields = [(r.__dict__["provider"], r.__dict__["status"]) for r in lines]
    assert fields == [("svc", 503), ("svc", 200)]
    everything = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in (canary, token, CLIENT_SECRET):
        assert secret not in everything
