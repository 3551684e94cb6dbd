"""Log output: the text format keeps every record on its own line, whatever a client sends;
JSON stays as it was. Against a real `tokenbroker serve` and through the formatters."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path

import httpx

from support import client_credentials, free_port, serve_process
from tokenbroker import Broker, parse_settings
from tokenbroker.core.events import (
    JobFinished,
    JobItemFinished,
    JobPhaseChanged,
    JobStarted,
    TokenAcquired,
)
from tokenbroker.core.secret import Secret
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.telemetry.logs import JsonFormatter, TextFormatter, log_job_event
from tokenbroker.testing import AuthorizationServer

KEY = new_key()
# What a forged record would start with: the text format's timestamp, level and logger.
FORGED = "1999-12-31 23:59:59,999 INFO tokenbroker.audit token read consumer=bob"
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+ ")
UNSAFE = "\r\n\x1b\x00\x7f\x85\u2028\u2029\u202e"


def serve_text_logs(
    tmp_path: Path, auth_server: AuthorizationServer, requests: object, mode: int = 0o600
) -> str:
    """Run `tokenbroker serve` with text logs at info (its config file at ``mode``), make
    ``requests(client)``, stop it, and return what it wrote to stderr."""
    port = free_port()
    path = tmp_path / "tokenbroker.yaml"
    provider = {
        **client_credentials(auth_server),
        "delegation": {"mode": "jwt", "audiences": ["https://files.example"]},
    }
    config = {
        "store": "memory",
        "defaults": {"retries": 0},
        "providers": {"svc": provider},
        "consumers": {"app": {"api_key_sha256": hash_key(KEY), "allow": ["svc"]}},
        "server": {"listen": f"127.0.0.1:{port}"},
        "telemetry": {"log_level": "info", "log_format": "text"},
    }
    with (
        serve_process(path, config, mode=mode) as served,
        httpx.Client(base_url=served.url, timeout=10) as client,
    ):
        requests(client)  # type: ignore[operator]
    return served.stderr


def test_a_forged_audit_line_in_request_input_stays_on_one_line(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """A provider name and a delegation audience carrying a newline and a fake record each give
    exactly one audit line (the real one, consumer=app) and no line that starts like a record
    from the injected text, however a reader splits lines."""
    auth = {"Authorization": f"Bearer {KEY}"}

    def requests(client: httpx.Client) -> None:
        read = client.get(
            f"/v1/tokens/x%0a{FORGED} provider=svc scope=read outcome=ok", headers=auth
        )
        assert read.status_code == 404
        body = {"provider": "svc", "audience": f"a{UNSAFE}{FORGED}"}
        assert client.post("/v1/delegations", json=body, headers=auth).status_code == 404

    lines = serve_text_logs(tmp_path, auth_server, requests).splitlines()
    carrying = [line for line in lines if "consumer=bob" in line]
    assert len(carrying) == 2, lines
    assert all(RECORD.match(line) for line in carrying), carrying
    assert [line.split(" consumer=")[1].split(" ")[0] for line in carrying] == ["app", "app"]
    assert [line for line in lines if line.startswith(FORGED[:10])] == []
    # Audit values with anything but visible ASCII are JSON-quoted (the API), and the text
    # formatter then doubles each backslash: no raw control character reaches the line.
    assert 'provider="x\\\\n1999-12-31' in carrying[0]
    assert 'audience="a\\\\r\\\\n\\\\u001b\\\\u0000\\\\u007f\\\\u0085' in carrying[1]


def test_text_formatter_escapes_message_arguments_and_extras() -> None:
    """Control characters in a record's message, its arguments and an extra field the format
    names come out as visible escapes on one line; a backslash is doubled."""
    record = logging.LogRecord(
        "tokenbroker.audit", logging.INFO, __file__, 1, "event%s x=%s", (UNSAFE, "a\\b"), None
    )
    record.consumer = f"c{UNSAFE}"
    line = TextFormatter("%(levelname)s %(consumer)s %(message)s").format(record)
    assert line.splitlines() == [line]
    assert not any(char in line for char in UNSAFE)
    escaped = "\\x0d\\x0a\\x1b\\x00\\x7f\\x85\\u2028\\u2029\\u202e"
    assert line == f"INFO c{escaped} event{escaped} x=a\\\\b"


def test_text_formatter_shows_an_exception_by_its_class_only() -> None:
    """An exception is named by its class, as in JSON: neither its text nor its traceback
    (which can quote secrets and span lines) is written."""
    try:
        raise ValueError("secret-value\nsecond line")
    except ValueError:
        record = logging.LogRecord(
            "tokenbroker.app", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = TextFormatter().format(record)
    assert line.endswith(" ERROR tokenbroker.app failed exception=ValueError")
    assert "secret-value" not in line and "Traceback" not in line


def test_json_lines_keep_the_values_as_they_were() -> None:
    """The JSON formatter is unchanged: the message decodes to exactly what was logged."""
    record = logging.LogRecord(
        "tokenbroker.audit", logging.INFO, __file__, 1, "event %s", (UNSAFE,), None
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    assert json.loads(line)["message"] == f"event {UNSAFE}"


def test_serve_logs_a_literal_secret_in_a_config_others_can_read(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """serve warns, as check does, that its config (mode 0644) holds a literal client_secret,
    without the secret; at 0600 it does not."""
    path = tmp_path / "tokenbroker.yaml"
    readable = serve_text_logs(tmp_path, auth_server, lambda client: None, mode=0o644)
    private = serve_text_logs(tmp_path, auth_server, lambda client: None)
    warning = (
        f"WARNING tokenbroker.server config providers.svc.client_secret: is a secret written"
        f" in {path}, which group or others may read (mode 0644): run `chmod 600 {path}`"
    )
    assert warning in readable
    assert "chmod" not in private
    assert "svc-secret" not in readable + private


def test_json_lines_carry_the_allowed_extra_fields_and_no_others() -> None:
    """Extras named in FIELDS become JSON keys with their types kept (a Secret as its redacted
    text); an unlisted extra (uvicorn's color_message, a 'password') is left out."""
    logger = logging.getLogger("tokenbroker.jobs")
    record = logger.makeRecord(
        "tokenbroker.jobs", logging.INFO, __file__, 1, "job warm started", (), None,
        extra={
            "event": "job_started", "job_id": "job_x", "kind": "warm", "phase": None,
            "elapsed_ms": 12.5, "retryable": True, "reason": Secret("hunter2"),
            "color_message": "\x1b[32mjob\x1b[0m", "password": "hunter2",
        },
    )  # fmt: skip
    entry = json.loads(JsonFormatter().format(record))
    assert entry["event"] == "job_started" and entry["job_id"] == "job_x"
    assert entry["kind"] == "warm" and entry["phase"] is None
    assert entry["elapsed_ms"] == 12.5 and entry["retryable"] is True
    assert entry["reason"] == "**********"
    assert "color_message" not in entry and "password" not in entry
    assert "hunter2" not in json.dumps(entry)


def test_job_events_give_one_json_line_per_start_phase_failure_and_finish() -> None:
    """A job of 10,000 items (2 failed) published on a real broker's bus gives exactly 7
    tokenbroker.jobs lines (start, 3 phases, 2 failed items, finish), each with event,
    job_id, kind, phase and elapsed_ms; token events give none."""
    broker = Broker(parse_settings("store: memory\nproviders: {}\n", {}))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tokenbroker.jobs")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    unsubscribe = broker.subscribe(log_job_event)
    job = {"provider": "pool", "job_id": "job_abc", "kind": "warm"}
    try:
        emit = broker.events.emit
        emit(TokenAcquired("pool", "account=a", background=False, duration=0.1, expires_in=60))
        emit(JobStarted(**job))
        emit(JobPhaseChanged(**job, phase="resolve"))
        emit(JobPhaseChanged(**job, phase="fetch", previous="resolve", previous_duration=0.1))
        for n in range(10_000):
            failed = n in {17, 9_000}
            emit(
                JobItemFinished(
                    **job, phase="fetch", item=f"user{n}", elapsed=n / 1000,
                    outcome="failed" if failed else "ok",
                    reason="invalid_grant" if failed else None,
                )
            )  # fmt: skip
        emit(JobPhaseChanged(**job, phase="verify", previous="fetch", elapsed=10.0))
        emit(JobFinished(**job, status="partial", phase="verify", ok=9_998, failed=2, elapsed=10.5))
    finally:
        unsubscribe()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        broker.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == [
        "job_started", "job_phase", "job_phase", "job_item_failed", "job_item_failed",
        "job_phase", "job_finished",
    ]  # fmt: skip
    for line in lines:
        assert {"event", "job_id", "kind", "phase", "elapsed_ms"} <= line.keys()
        assert line["job_id"] == "job_abc" and line["kind"] == "warm"
        assert line["logger"] == "tokenbroker.jobs"
    assert [line["item"] for line in lines if line["event"] == "job_item_failed"] == [
        "user17", "user9000",
    ]  # fmt: skip
    assert lines[3]["level"] == "warning" and lines[3]["reason"] == "invalid_grant"
    assert lines[3]["elapsed_ms"] == 17.0
    assert lines[-1]["status"] == "partial" and lines[-1]["elapsed_ms"] == 10500.0
    assert lines[-1]["ok"] == 9_998 and lines[-1]["failed"] == 2
    assert lines[-1]["level"] == "warning" and lines[-1]["phase"] == "verify"
