"""OpenTelemetry tracing (issue 19 §1): spans exported over OTLP to real in-process receivers
(gRPC and HTTP), their tree and attributes, W3C trace context in and out, and no secret in
any exported byte. Real components throughout: the bundled authorization server, the
recording upstream, the proxy, and ``tokenbroker serve`` as a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import POOL_ACCOUNTS, BrokerFactory
from otlp_receiver import GrpcReceiver, HttpReceiver, SpanView, tree
from support import client_credentials, free_port, refresh_token, serve_process, wait_for
from tokenbroker import Broker
from tokenbroker.config import JobsSettings, ProxySettings
from tokenbroker.config.sections import TelemetrySettings
from tokenbroker.core import tracing
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.jobs.service import JobService
from tokenbroker.telemetry.tracing import OtelTracer, configure
from tokenbroker.testing import AuthorizationServer, Fault, RecordingUpstream, ServedProxy

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
CALLER = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"

Traced = Callable[..., OtelTracer]


@pytest.fixture
def traced() -> Iterator[Traced]:
    """``traced(url, protocol)`` installs a tracer exporting there; uninstalled (and flushed)
    after the test."""
    made: list[OtelTracer] = []

    def start(url: str, protocol: str = "grpc", **fields: Any) -> OtelTracer:
        settings = TelemetrySettings(otlp_endpoint=url, otlp_protocol=protocol, **fields)
        tracer = configure(settings, {}, schedule_delay_millis=50)
        assert tracer is not None
        made.append(tracer)
        return tracer

    yield start
    tracing.install(None)
    for tracer in made:
        tracer.shutdown()


def flushed(tracer: OtelTracer) -> None:
    """Export everything now (what a process does at exit)."""
    tracing.install(None)
    tracer.shutdown()


def context(traceparent: str | None) -> tuple[str, str, bool]:
    """Trace id, parent id and the sampled flag of a W3C ``traceparent`` value."""
    assert traceparent is not None
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


def under(spans: list[SpanView], span: SpanView, ancestor: SpanView) -> bool:
    """Whether ``ancestor`` is ``span``'s parent, or its parent's, and so on."""
    parents = {s.span_id: s.parent_id for s in spans}
    parent = span.parent_id
    while parent and parent != ancestor.span_id:
        parent = parents.get(parent, "")
    return parent == ancestor.span_id


def named(spans: list[SpanView], name: str) -> list[SpanView]:
    return [s for s in spans if s.name == name]


def one(spans: list[SpanView], name: str) -> SpanView:
    found = named(spans, name)
    assert len(found) == 1, tree(spans)
    return found[0]


def test_nothing_of_opentelemetry_is_imported_without_an_endpoint(tmp_path: Path) -> None:
    """With tracing off a broker and the proxy import no opentelemetry module at all, and the
    API app none of the SDK, the exporters or our glue (FastAPI itself imports the
    opentelemetry API package). A fresh interpreter: this one has imported them for the
    other tests."""
    config = tmp_path / "tokenbroker.yaml"
    config.write_text(
        "store: memory\nproviders:\n  svc:\n    grant: client_credentials\n"
        "    token_url: http://127.0.0.1:9/token\n    client_id: a\n    client_secret: b\n"
        "proxy:\n  routes:\n    - {prefix: /, upstream: 'http://127.0.0.1:9', provider: svc,"
        " mode: shared}\n"
    )
    script = (
        "import sys\n"
        "from tokenbroker import Broker\n"
        "from tokenbroker.proxy import ProxyServer\n"
        f"broker = Broker.from_config({str(config)!r})\n"
        "ProxyServer(broker, broker.settings.proxy)\n"
        "def otel(): return sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "print(otel())\n"
        "from tokenbroker.api.app import create_app\n"
        "from tokenbroker.cli.serve import _start_tracing\n"
        "create_app(broker)\n"
        "assert _start_tracing(broker) is None\n"
        "broker.close()\n"
        "ours = [m for m in sys.modules if m == 'tokenbroker.telemetry.tracing']\n"
        "print([m for m in otel() if m.split('.')[1:2] in (['sdk'], ['exporter'], ['proto'])] + ours)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "[]"]


def test_settings_and_variables_choose_the_exporter() -> None:
    """The endpoint comes from the config or the OTEL_* variables; gRPC by default on 4317,
    HTTP on 4318 at /v1/traces; OTEL_SDK_DISABLED turns tracing off."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    from tokenbroker.telemetry.tracing import exporter

    off = TelemetrySettings()
    assert off.endpoint({}) is None
    assert off.endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == "http://c:4317"
    on = TelemetrySettings(otlp_endpoint="collector")
    assert on.endpoint({"OTEL_SDK_DISABLED": "true"}) is None
    assert isinstance(exporter(on, {}, "collector"), Grpc)
    http_settings = TelemetrySettings(otlp_protocol="http/protobuf")
    made = exporter(http_settings, {}, "collector")
    assert isinstance(made, Http)
    assert made._endpoint == "http://collector:4318/v1/traces"
    assert isinstance(exporter(off, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "c"), Http)
    with pytest.raises(ValueError, match="sample_ratio"):
        TelemetrySettings.model_validate({"sample_ratio": 2})


def test_cold_token_read_exports_its_span_tree_over_grpc(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, traced: Traced
) -> None:
    """A cold read of a rotating refresh token: token → lease → token request (with the
    provider's status) and store commit, the token request's traceparent is what the
    authorization server got; the second read is a hit."""
    seed = auth_server.issue_refresh_token("rt-client", "read")
    broker = make_broker({"rt": refresh_token(auth_server, seed)})
    with GrpcReceiver() as receiver:
        tracer = traced(receiver.url, "grpc", service_name="broker-test")
        with tracer.span("caller"):
            broker.get_token("rt")
            broker.get_token("rt")
        flushed(tracer)
        spans = receiver.spans()
    keys = ("outcome", "provider", "attempt", "http.response.status_code", "fence")
    print(tree(spans, keys=keys))
    caller = one(spans, "caller")
    acquisitions = named(spans, "tokenbroker.token")
    assert [a.attributes["outcome"] for a in acquisitions] == ["fetched", "hit"]
    cold = acquisitions[0]
    assert cold.parent_id == caller.span_id
    assert cold.attributes["provider"] == "rt"
    lease = one(spans, "tokenbroker.lease")
    assert lease.parent_id == cold.span_id
    request = one(spans, "tokenbroker.token_request")
    assert request.parent_id == lease.span_id
    assert request.attributes["attempt"] == 1
    assert request.attributes["http.response.status_code"] == 200
    assert one(spans, "tokenbroker.store.commit").parent_id == lease.span_id
    assert {s.trace_id for s in spans} == {caller.trace_id}
    assert {s.service for s in spans} == {"broker-test"}
    sent = [r for r in auth_server.requests if r.grant == "refresh_token"]
    assert [context(r.headers.get("traceparent")) for r in sent] == [
        (request.trace_id, request.span_id, True)
    ]


def test_failed_token_requests_record_each_attempt_and_its_retry_delay(
    auth_server: AuthorizationServer, make_broker: BrokerFactory, traced: Traced
) -> None:
    """A provider that answers 503 three times: one failed acquisition, three attempts with
    their status, the first two with the delay before the next."""
    auth_server.inject(Fault(status=503, body='{"error": "temporarily_unavailable"}'), times=3)
    broker = make_broker({"svc": client_credentials(auth_server)})
    with GrpcReceiver() as receiver:
        tracer = traced(receiver.url)
        with pytest.raises(Exception, match="svc"):
            broker.get_token("svc")
        flushed(tracer)
        spans = receiver.spans()
    acquisition = one(spans, "tokenbroker.token")
    assert acquisition.attributes["outcome"] == "failed"
    assert acquisition.status == 2
    attempts = named(spans, "tokenbroker.token_request")
    assert [a.attributes["attempt"] for a in attempts] == [1, 2, 3]
    assert {a.attributes["http.response.status_code"] for a in attempts} == {503}
    assert ["retry_delay_s" in a.attributes for a in attempts] == [True, True, False]
    assert all(under(spans, a, acquisition) for a in attempts), tree(spans)


@pytest.fixture
def upstream(auth_server: AuthorizationServer) -> Iterator[RecordingUpstream]:
    with RecordingUpstream(auth_server) as server:
        yield server


def pool_proxy(upstream: RecordingUpstream) -> ProxySettings:
    route = {"prefix": "/", "upstream": upstream.url, "provider": "db", "mode": "pool"}
    return ProxySettings.model_validate(
        {"listen": "127.0.0.1:0", "health_listen": "127.0.0.1:0", "routes": [route]}
    )


def call(url: str, path: str = "/api/echo", headers: dict[str, str] | None = None) -> int:
    parts = httpx.URL(url)
    conn = http.client.HTTPConnection(parts.host, parts.port, timeout=10)
    try:
        conn.request("GET", path, headers={"X-Client": "c", **(headers or {})})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_proxied_request_continues_the_callers_trace_over_http(
    auth_server: AuthorizationServer,
    pool_broker: Broker,
    upstream: RecordingUpstream,
    traced: Traced,
) -> None:
    """A proxied request with a traceparent: its span is the caller's child, with route,
    status, account index and lease wait; the upstream saw this span's traceparent (the
    caller's trace id), not the caller's; a 401 is retried once, under the same span, with
    the re-login as its child."""
    with HttpReceiver() as receiver:
        tracer = traced(receiver.url, "http/protobuf")
        with ServedProxy(pool_broker, pool_proxy(upstream)) as proxy:
            assert call(proxy.url, headers={"traceparent": CALLER}) == 200
            auth_server.expire_all_access_tokens()
            assert call(proxy.url, headers={"traceparent": CALLER}) == 200
        flushed(tracer)
        spans = receiver.spans()
    print(tree(spans, keys=("http.route", "http.response.status_code", "outcome")))
    proxied = named(spans, "tokenbroker.proxy")
    assert len(proxied) == 2
    first, second = proxied
    for span in proxied:
        assert (span.trace_id, span.parent_id) == (CALLER_TRACE, CALLER_SPAN)
        assert span.attributes["http.route"] == "/"
        assert span.attributes["http.response.status_code"] == 200
        assert span.attributes["tokenbroker.account.index"] in range(len(POOL_ACCOUNTS))
        assert span.attributes["tokenbroker.lease.wait_ms"] >= 0
    assert first.attributes["tokenbroker.retried_after_401"] is False
    assert second.attributes["tokenbroker.retried_after_401"] is True
    seen = [context(dict(r.headers).get("traceparent")) for r in upstream.records()]
    assert seen == [
        (CALLER_TRACE, first.span_id, True),
        (CALLER_TRACE, second.span_id, True),  # the 401 …
        (CALLER_TRACE, second.span_id, True),  # … and the resend
    ]
    relogin = [s for s in named(spans, "tokenbroker.token_request") if s.trace_id == CALLER_TRACE]
    assert relogin, tree(spans)
    assert under(spans, relogin[0], second), tree(spans)


def test_unsampled_requests_export_nothing_and_still_carry_context(
    pool_broker: Broker, upstream: RecordingUpstream, traced: Traced
) -> None:
    """With sample_ratio 0 no span is exported, and the upstream still gets a traceparent
    (flag 00) so the trace id is kept along the way."""
    with GrpcReceiver() as receiver:
        tracer = traced(receiver.url, sample_ratio=0.0)
        with ServedProxy(pool_broker, pool_proxy(upstream)) as proxy:
            assert call(proxy.url) == 200
        flushed(tracer)
        assert receiver.spans() == []
    trace_id, span_id, sampled = context(dict(upstream.records()[-1].headers)["traceparent"])
    assert len(trace_id) == 32 and len(span_id) == 16 and not sampled


def test_a_callers_unsampled_trace_is_carried_to_the_upstream_and_the_provider(
    auth_server: AuthorizationServer,
    pool_broker: Broker,
    upstream: RecordingUpstream,
    traced: Traced,
) -> None:
    """At sample_ratio 1, a caller's traceparent with the sampled flag clear is followed:
    nothing is exported, the upstream gets the caller's trace id under a new span id
    (flag 00), and so does a login the request needed (after a 401, inside its span).
    A malformed or non-00 traceparent is no parent: a new, sampled trace."""
    unsampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"
    with GrpcReceiver() as receiver:
        tracer = traced(receiver.url, sample_ratio=1.0)
        with ServedProxy(pool_broker, pool_proxy(upstream)) as proxy:
            assert call(proxy.url, headers={"traceparent": unsampled}) == 200
            sent = dict(upstream.records()[-1].headers)["traceparent"]
            before = len(auth_server.requests)
            auth_server.expire_all_access_tokens()  # a 401, and a login inside the request
            assert call(proxy.url, headers={"traceparent": unsampled}) == 200
            logins = [r for r in auth_server.requests[before:] if r.grant == "login"]
            for bad in (
                unsampled.upper(),  # upper-case hex is malformed
                f"00-{'0' * 32}-{CALLER_SPAN}-00",  # an invalid (zero) trace id
                f"00-{CALLER_TRACE}-{CALLER_SPAN}-0",
                f"00-{CALLER_TRACE}-{CALLER_SPAN}-00-extra",
            ):
                assert call(proxy.url, headers={"traceparent": bad}) == 200
                fresh = context(dict(upstream.records()[-1].headers)["traceparent"])
                assert fresh[0] != CALLER_TRACE and fresh[2], bad
        flushed(tracer)
        spans = receiver.spans()
    assert [s for s in spans if s.trace_id == CALLER_TRACE] == [], tree(spans)
    assert len(named(spans, "tokenbroker.proxy")) == 4
    trace_id, span_id, sampled = context(sent)
    assert (trace_id, sampled) == (CALLER_TRACE, False) and span_id != CALLER_SPAN
    assert logins and logins[0].headers.get("traceparent") is not None
    assert context(logins[0].headers["traceparent"])[0::2] == (CALLER_TRACE, False)


def test_no_secret_token_key_or_query_reaches_the_collector(
    auth_server: AuthorizationServer,
    make_broker: BrokerFactory,
    upstream: RecordingUpstream,
    traced: Traced,
) -> None:
    """Client secret, refresh tokens (seed and rotated), access tokens, login passwords and a
    proxied query string: none of them in any byte the receiver got."""
    secret = "canary-client-secret-5b1f"
    auth_server.add_client("canary-client", secret, scopes=["read"])
    auth_server.add_account("carol", "canary-password-77d2")
    seed = auth_server.issue_refresh_token("rt-client", "read")
    broker = make_broker(
        {
            "svc": client_credentials(auth_server, client_id="canary-client", client_secret=secret),
            "rt": refresh_token(auth_server, seed),
            "db": {
                "grant": "login",
                "login_url": auth_server.login_url,
                "token_path": "data.token",
                "credentials": [{"username": "carol", "password": "canary-password-77d2"}],
            },
        }
    )
    with GrpcReceiver() as receiver:
        tracer = traced(receiver.url)
        tokens = [broker.get_token(name).access_token for name in ("svc", "rt", "db")]
        with ServedProxy(broker, pool_proxy(upstream)) as proxy:
            assert call(proxy.url, "/api/echo?api_key=canary-query-9c3e") == 200
        flushed(tracer)
        exported = receiver.everything()
        spans = receiver.spans()
    assert named(spans, "tokenbroker.proxy") and named(spans, "tokenbroker.lease")
    rotated = [r.form.get("refresh_token") for r in auth_server.requests]
    canaries = [
        secret,
        seed,
        "canary-password-77d2",
        "canary-query-9c3e",
        *tokens,
        upstream.records()[-1].token,
        *[value for value in rotated if value],
    ]
    for canary in canaries:
        assert canary.encode() not in exported, "a secret reached the collector"


def test_serve_traces_api_requests_and_writes_trace_ids_in_log_lines(
    tmp_path: Path,
    auth_server: AuthorizationServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`tokenbroker serve` (a subprocess) with telemetry.otlp_endpoint: a token read with a
    traceparent is a child of the caller's span (route template, status, consumer name, never
    the key), its token request is a child of it, and the audit line written inside it carries
    the same trace and span ids; spans are exported at SIGTERM."""
    key = new_key()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with GrpcReceiver() as receiver:
        config = {
            "store": "memory",
            "defaults": {"retries": 0},
            "providers": {"svc": client_credentials(auth_server)},
            "consumers": {"app": {"api_key_sha256": hash_key(key), "allow": ["svc"]}},
            "server": {"listen": f"127.0.0.1:{free_port()}"},
            "telemetry": {"log_level": "info", "otlp_endpoint": receiver.url},
        }
        with serve_process(tmp_path / "tokenbroker.yaml", config) as served:
            reply = httpx.get(
                served.url + "/v1/tokens/svc",
                headers={"Authorization": f"Bearer {key}", "traceparent": CALLER},
                timeout=10,
            )
            assert reply.status_code == 200
            token = reply.json()["access_token"]
        spans = receiver.spans()
        exported = receiver.everything()
    print(tree(spans, keys=("http.route", "consumer", "outcome")))
    api = one([s for s in spans if s.trace_id == CALLER_TRACE], "tokenbroker.api")
    assert (api.trace_id, api.parent_id) == (CALLER_TRACE, CALLER_SPAN)
    assert api.attributes["http.route"] == "/v1/tokens/{provider}"
    assert api.attributes["http.response.status_code"] == 200
    assert api.attributes["consumer"] == "app"
    acquisition = one(spans, "tokenbroker.token")
    assert acquisition.parent_id == api.span_id
    assert under(spans, one(spans, "tokenbroker.token_request"), acquisition)
    assert key.encode() not in exported and token.encode() not in exported
    logged = [json.loads(line) for line in served.stderr.splitlines() if line.startswith("{")]
    inside = [entry for entry in logged if entry.get("trace_id") == CALLER_TRACE]
    assert inside, served.stderr
    assert {entry["span_id"] for entry in inside} <= {s.span_id for s in spans}


def test_a_job_and_its_phases_are_spans_over_their_token_reads(
    pool_broker: Broker, traced: Traced
) -> None:
    """A warm job of a three-account pool: one job span (kind, status) with a span per phase
    (resolve, fetch, verify), and the accounts' logins under the fetch phase."""
    with GrpcReceiver() as receiver:
        tracer = traced(receiver.url)
        service = JobService(pool_broker, settings=JobsSettings(poll_seconds=0.05))
        service.start_background()
        try:
            job, _ = service.start("warm", {"provider": "db"}, "ops")
            wait_for(lambda: service.require(job.job_id).status.final, "the job to end", 15)
        finally:
            service.stop_background()
        flushed(tracer)
        spans = receiver.spans()
    print(tree(spans, keys=("job.kind", "job.status", "job.phase", "outcome")))
    root = one(spans, "tokenbroker.job")
    assert root.attributes["job.kind"] == "warm"
    assert root.attributes["job.status"] == "done"
    phases = named(spans, "tokenbroker.job.phase")
    assert [p.attributes["job.phase"] for p in phases] == ["resolve", "fetch", "verify"]
    assert {p.parent_id for p in phases} == {root.span_id}
    fetch = phases[1]
    logins = named(spans, "tokenbroker.token_request")
    assert len(logins) == len(POOL_ACCOUNTS)
    assert all(under(spans, login, fetch) for login in logins), tree(spans)
