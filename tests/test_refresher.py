"""The fenced refresh protocol end to end: shared stores, restarts, recovery by rotation policy."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import traceback
import types
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support import refresh_token, stampede
from tokenbroker import (
    Broker,
    ManualClock,
    ProviderError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    parse_settings,
)
from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.secret import Secret
from tokenbroker.testing import AuthorizationServer, Fault

KEY = generate_key()


def file_broker(
    path: Path, providers: dict[str, Any], defaults: dict[str, Any] | None = None, **kwargs: Any
) -> Broker:
    """A broker on a SQLite file, as a separate process would build it."""
    config = {
        "store": f"sqlite:///{path}",
        "encryption_keys": [KEY],
        "defaults": {
            "retries": 1,
            "backoff_seconds": 0.01,
            "deadline_seconds": 3,
            **(defaults or {}),
        },
        "providers": providers,
    }
    return Broker(parse_settings(yaml.safe_dump(config), {}), **kwargs)


@pytest.fixture
def rt_server() -> Any:
    server = AuthorizationServer(expires_in=3600)
    server.add_client("rt-client", None, auth_method="none", scopes=["read"])
    server.add_client("cc", "cc-secret", scopes=["read", "write"])
    with server:
        yield server


def cc(server: AuthorizationServer, **extra: Any) -> dict[str, Any]:
    return {
        "grant": "client_credentials",
        "token_url": server.token_url,
        "client_id": "cc",
        "client_secret": "cc-secret",
        "scopes": ["read"],
        **extra,
    }


def test_restart_with_valid_tokens_sends_nothing(
    rt_server: AuthorizationServer, tmp_path: Path
) -> None:
    """A new broker on the same file serves the stored tokens: 0 requests to the provider."""
    seed = rt_server.issue_refresh_token("rt-client")
    providers = {"rt": refresh_token(rt_server, seed), "cc": cc(rt_server)}
    with file_broker(tmp_path / "tb.db", providers) as first:
        tokens = {p: first.get_token(p).access_token for p in providers}
    before = (rt_server.count("refresh_token"), rt_server.count("client_credentials"))
    with file_broker(tmp_path / "tb.db", providers) as second:
        again = {p: second.get_token(p).access_token for p in providers}
    assert again == tokens
    assert (
        (rt_server.count("refresh_token"), rt_server.count("client_credentials"))
        == before
        == (1, 1)
    )


def test_brokers_sharing_a_file_fetch_once(rt_server: AuthorizationServer, tmp_path: Path) -> None:
    """Three brokers (as three processes would) × 100 threads on a cold key: one token request."""
    rt_server.latency = 0.2
    brokers = [file_broker(tmp_path / "tb.db", {"cc": cc(rt_server)}) for _ in range(3)]
    try:
        results = stampede(300, lambda: brokers[threading.get_ident() % 3].get_token("cc"))
    finally:
        for broker in brokers:
            broker.close()
    assert rt_server.count("client_credentials") == 1
    assert len({r.access_token for r in results}) == 1  # type: ignore[union-attr]


def test_invalidated_token_is_replaced_even_if_the_store_still_has_it(
    rt_server: AuthorizationServer, tmp_path: Path
) -> None:
    """Compare-and-invalidate reaches past the store: the rejected token is never served again."""
    with file_broker(tmp_path / "tb.db", {"cc": cc(rt_server)}) as broker:
        rejected = broker.get_token("cc").access_token
        assert broker.invalidate("cc", rejected)
        fresh = broker.get_token("cc").access_token
    assert fresh != rejected
    assert rt_server.count("client_credentials") == 2


def test_settings_change_starts_a_new_key_but_keeps_the_refresh_token(
    rt_server: AuthorizationServer, tmp_path: Path
) -> None:
    """New scopes mean a new client-credentials token; the refresh-token chain survives a change."""
    seed = rt_server.issue_refresh_token("rt-client", scope="read")
    with file_broker(
        tmp_path / "tb.db", {"cc": cc(rt_server), "rt": refresh_token(rt_server, seed)}
    ) as b:
        b.get_token("cc")
        b.get_token("rt")
    changed = {
        "cc": cc(rt_server, scopes=["write"]),
        "rt": refresh_token(rt_server, seed, scopes=["read"]),
    }
    with file_broker(tmp_path / "tb.db", changed) as b:
        b.get_token("cc")
        b.get_token("rt")
    assert rt_server.count("client_credentials") == 2
    presented = rt_server.presented_refresh_tokens
    assert len(presented) == 2
    assert presented[0] == seed
    assert presented[1] != seed  # the stored successor, not the configured seed
    assert not rt_server.reused_refresh_tokens()


def test_new_seed_in_config_recovers_from_reauthorization(
    rt_server: AuthorizationServer, tmp_path: Path
) -> None:
    """After reauthorization_required, configuring a fresh refresh token makes the credential work."""
    dead = rt_server.issue_refresh_token("rt-client")
    rt_server.inject(Fault(status=400, body='{"error":"invalid_grant"}'))
    with file_broker(tmp_path / "tb.db", {"rt": refresh_token(rt_server, dead)}) as b:
        with pytest.raises(ReauthorizationRequiredError):
            b.get_token("rt")
        assert b.store.load("rt").state == "reauthorization_required"
    with (
        file_broker(tmp_path / "tb.db", {"rt": refresh_token(rt_server, dead)}) as b,
        pytest.raises(ReauthorizationRequiredError),
    ):
        b.get_token("rt")
    assert rt_server.count("refresh_token") == 1  # the dead state is remembered across restarts
    fresh = rt_server.issue_refresh_token("rt-client")
    with file_broker(tmp_path / "tb.db", {"rt": refresh_token(rt_server, fresh)}) as b:
        assert b.get_token("rt").access_token
        assert b.store.load("rt").state == "active"


def interrupted_attempt(broker: Broker, server: AuthorizationServer) -> None:
    """Leave an intent record behind, as a process killed before sending would."""
    broker.get_token("rt")
    store = broker.store
    lease = store.acquire("rt", "rt", "someone-else", 30)
    assert lease is not None
    store.begin_attempt(lease)
    store.release(lease)


@pytest.mark.parametrize(("rotation", "grace"), [("strict", 0), ("grace", 86400)])
def test_interrupted_attempt_is_recovered_once(tmp_path: Path, rotation: str, grace: int) -> None:
    """An intent left by a crash before sending: the next refresh recovers with one request."""
    server = AuthorizationServer(rotation=rotation, reuse_grace_seconds=grace)
    server.add_client("rt-client", None, auth_method="none")
    with server:
        seed = server.issue_refresh_token("rt-client")
        clock = ManualClock()
        provider = refresh_token(
            server, seed, rotation={"single_use": True, "reuse_grace_seconds": grace}
        )
        with file_broker(tmp_path / "tb.db", {"rt": provider}, clock=clock) as broker:
            interrupted_attempt(broker, server)
            clock.advance(3600)
            assert broker.get_token("rt").access_token
            attempts = broker.store.attempts("rt")
        assert [a.status for a in attempts] == ["succeeded", "superseded", "succeeded"]
        assert attempts[-1].recovery is (grace == 0)
        assert server.count("refresh_token") == 2
        assert not server.reused_refresh_tokens()


def test_strict_recovery_after_the_provider_rotated_reports_reauthorization(tmp_path: Path) -> None:
    """The provider rotated but we lost the reply (in doubt): one recovery, then reauthorization_required."""
    server = AuthorizationServer(rotation="strict")
    server.add_client("rt-client", None, auth_method="none")
    with server:
        seed = server.issue_refresh_token("rt-client")
        clock = ManualClock()
        with file_broker(
            tmp_path / "tb.db", {"rt": refresh_token(server, seed)}, clock=clock
        ) as broker:
            broker.get_token("rt")
            row = broker.store.load("rt")
            # The lost exchange: the provider rotates the stored token, we never see the reply.
            import httpx

            httpx.post(
                server.token_url,
                data={
                    "grant_type": "refresh_token",
                    "client_id": "rt-client",
                    "refresh_token": row.refresh_token.reveal(),
                },
            )
            lease = broker.store.acquire("rt", "rt", "crashed", 30)
            broker.store.begin_attempt(lease)
            broker.store.release(lease)
            before = server.count("refresh_token")
            clock.advance(3600)
            with pytest.raises(ReauthorizationRequiredError):
                broker.get_token("rt")
            clock.advance(3600)
            with pytest.raises(ReauthorizationRequiredError):
                broker.get_token("rt")
            assert broker.store.load("rt").state == "reauthorization_required"
        assert server.count("refresh_token") - before == 1


def test_grace_in_doubt_beyond_the_grace_is_reauthorization(tmp_path: Path) -> None:
    """An in-doubt attempt older than reuse_grace_seconds is not retried."""
    server = AuthorizationServer(rotation="grace", reuse_grace_seconds=86400)
    server.add_client("rt-client", None, auth_method="none")
    with server:
        seed = server.issue_refresh_token("rt-client")
        clock = ManualClock()
        provider = refresh_token(
            server, seed, rotation={"single_use": True, "reuse_grace_seconds": 1}
        )
        with file_broker(tmp_path / "tb.db", {"rt": provider}, clock=clock) as broker:
            interrupted_attempt(broker, server)
            raw = broker.store.raw()
            for attempt in broker.store.attempts("rt"):
                started = raw.read("tb_attempt", attempt.id, "started_at")
                raw.write("tb_attempt", attempt.id, "started_at", started - 10)
            before = server.count("refresh_token")
            clock.advance(3600)
            with pytest.raises(ReauthorizationRequiredError):
                broker.get_token("rt")
        assert server.count("refresh_token") == before


def test_dead_lease_holder_on_this_host_is_taken_over_at_once(
    rt_server: AuthorizationServer, tmp_path: Path
) -> None:
    """A lease held by a process that no longer exists does not make anyone wait for its expiry."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    import socket

    dead_owner = f"{socket.gethostname()}:{child.stdout.strip()}:deadbeef"
    with file_broker(tmp_path / "tb.db", {"cc": cc(rt_server)}) as broker:
        broker.get_token("cc")
        row_id = broker.store.states()[0]["id"]
        broker.store.raw().write("tb_credential", row_id, "lease_owner", dead_owner)
        broker.store.raw().write("tb_credential", row_id, "lease_expires_at", 9e12)
        broker.invalidate("cc", broker.get_token("cc").access_token)
        assert broker.get_token("cc").access_token
    assert rt_server.count("client_credentials") == 2


def test_live_lease_holder_makes_others_wait_then_give_up(
    rt_server: AuthorizationServer, tmp_path: Path
) -> None:
    """A lease held by a live process is respected: the caller waits, then fails without sending."""
    defaults = {"deadline_seconds": 0.3, "lease_seconds": 2.6}
    with file_broker(tmp_path / "tb.db", {"cc": cc(rt_server)}, defaults) as broker:
        broker.get_token("cc")
        row_id = broker.store.states()[0]["id"]
        broker.store.raw().write("tb_credential", row_id, "lease_owner", "elsewhere:1:x")
        broker.store.raw().write("tb_credential", row_id, "lease_expires_at", 9e12)
        broker.invalidate("cc", broker.get_token("cc").access_token)
        with pytest.raises(ProviderUnavailableError) as caught:
            broker.get_token("cc")
    assert caught.value.sent is False
    assert rt_server.count("client_credentials") == 1


def test_dead_credential_never_serves_its_stored_token(tmp_path: Path) -> None:
    """Once strict reuse detection killed the credential, a fresh broker on the store raises
    reauthorization_required with 0 requests instead of serving the (revoked) stored token."""
    server = AuthorizationServer(rotation="strict")
    server.add_client("rt-client", None, auth_method="none")
    with server:
        seed = server.issue_refresh_token("rt-client")
        clock = ManualClock()
        with file_broker(tmp_path / "tb.db", {"rt": refresh_token(server, seed)}, clock=clock) as b:
            b.get_token("rt")
            server.inject(Fault(status=400, body='{"error":"invalid_grant"}'))
            clock.advance(3600)
            with pytest.raises(ReauthorizationRequiredError):
                b.get_token("rt")
        before = server.count("refresh_token")
        with (
            file_broker(tmp_path / "tb.db", {"rt": refresh_token(server, seed)}) as fresh,
            pytest.raises(ReauthorizationRequiredError),
        ):
            fresh.get_token("rt")
        assert server.count("refresh_token") == before


def test_malformed_200_on_refresh_is_kept_encrypted_and_in_doubt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A5: a 200 that holds no usable token reply: no crash; the attempt is in_doubt and the
    reply is stored encrypted on it (the provider may have rotated in it); no log line, error
    message or repr carries its bytes."""
    server = AuthorizationServer(rotation="grace", reuse_grace_seconds=86400)
    server.add_client("rt-client", None, auth_method="none")
    canary = "CANARY-A5-" + generate_key()[:12]
    body = f'{{"access_token": "{canary}", "refresh_token": "{canary}'.encode()  # cut short
    caplog.set_level("DEBUG")
    with server:
        seed = server.issue_refresh_token("rt-client")
        provider = refresh_token(
            server, seed, rotation={"single_use": True, "reuse_grace_seconds": 86400}
        )
        server.inject(Fault(status=200, body=body), times=None)
        with file_broker(tmp_path / "tb.db", {"rt": provider}) as broker:
            with pytest.raises(ProviderUnavailableError) as raised:
                broker.get_token("rt")
            attempts = broker.store.attempts("rt")
            row = broker.store.load("rt")
    assert [a.status for a in attempts] == ["in_doubt"]
    assert row is not None and row.state == "in_doubt"
    with sqlite3.connect(tmp_path / "tb.db") as db:
        (raw_ct,) = db.execute(
            "SELECT raw_ct FROM tb_attempt WHERE id = ?", (attempts[0].id,)
        ).fetchone()
    assert canary.encode() not in raw_ct
    keyring = Keyring([Secret(KEY)])
    assert keyring.decrypt(raw_ct, f"tb_attempt|{attempts[0].id}|raw".encode()) == body
    seen = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert seen  # the failure was logged
    assert not [line for line in seen if canary in line]
    assert canary not in str(raised.value) and canary not in repr(raised.value)


def canary_paths(exc: BaseException, canary: str) -> list[str]:
    """Everywhere ``canary`` shows in an exception: its text, repr, formatted traceback (chain
    included, every frame's locals as an error reporter captures them) and every attribute,
    arg, slot and chained exception, walked recursively."""
    found: list[str] = []
    seen: set[int] = set()

    def text(where: str, value: str) -> None:
        if canary in value:
            found.append(where)

    def visit(obj: object, where: str, depth: int) -> None:
        if id(obj) in seen or depth > 10:
            return
        seen.add(id(obj))
        if isinstance(obj, bytes | bytearray | memoryview):
            text(where, bytes(obj).decode("latin-1"))
            return
        if isinstance(obj, str):
            text(where, obj)
            return
        if obj is None or isinstance(obj, int | float | type | types.ModuleType):
            return
        if callable(obj) and not isinstance(obj, BaseException):
            return
        for form in (repr, str):
            text(f"{form.__name__}({where})", form(obj))
        if isinstance(obj, BaseException):
            formatted = traceback.TracebackException.from_exception(obj, capture_locals=True)
            text(f"traceback({where})", "".join(formatted.format()))
            text(f"format_exception({where})", "".join(traceback.format_exception(obj)))
            visit(obj.args, f"{where}.args", depth + 1)
            visit(obj.__cause__, f"{where}.__cause__", depth + 1)
            visit(obj.__context__, f"{where}.__context__", depth + 1)
            visit(getattr(obj, "__notes__", None), f"{where}.__notes__", depth + 1)
        if isinstance(obj, dict):
            for key, value in obj.items():
                visit(key, f"{where}[key]", depth + 1)
                visit(value, f"{where}[{key!r}]", depth + 1)
            return
        if isinstance(obj, list | tuple | set | frozenset):
            for i, item in enumerate(obj):
                visit(item, f"{where}[{i}]", depth + 1)
            return
        names = set(getattr(obj, "__dict__", {}))
        for klass in type(obj).__mro__:
            slots = klass.__dict__.get("__slots__", ())
            names.update([slots] if isinstance(slots, str) else slots)
        names.update(n for n in dir(obj) if not n.startswith("__"))
        for name in sorted(names - {"__traceback__", "__weakref__", "__dict__"}):
            try:
                value = getattr(obj, name)
            except Exception:  # noqa: S112 - a property that cannot be read holds nothing
                continue
            visit(value, f"{where}.{name}", depth + 1)

    visit(exc, "exc", 0)
    return found


@pytest.mark.parametrize(("rotation", "grace"), [("strict", 0), ("grace", 86400)])
def test_rotated_refresh_token_in_an_unusable_reply_reaches_no_caller(
    tmp_path: Path, rotation: str, grace: int
) -> None:
    """A 2xx reply with a refresh token but no access token: the concurrent get_token callers'
    exceptions carry the rotated token nowhere (attributes, args, chain, text, traceback locals);
    the reply is still kept encrypted on the in-doubt attempt (A5)."""
    server = AuthorizationServer(rotation=rotation, reuse_grace_seconds=grace)
    server.add_client("rt-client", None, auth_method="none")
    canary = f"CANARY_RT_{uuid.uuid4().hex}"
    body = json.dumps({"refresh_token": canary}).encode()
    with server:
        seed = server.issue_refresh_token("rt-client")
        provider = refresh_token(
            server, seed, rotation={"single_use": True, "reuse_grace_seconds": grace}
        )
        server.inject(Fault(status=200, body=body), times=None)
        with file_broker(tmp_path / "tb.db", {"rt": provider}) as broker:
            results = stampede(8, lambda: broker.get_token("rt"))
            attempts = broker.store.attempts("rt")
        sent = server.count("refresh_token")
    assert sent == 2  # one flight for all 8 callers: the first try and one resend
    assert all(isinstance(r, ProviderError) for r in results), results
    for i, error in enumerate(results):
        assert isinstance(error, BaseException)
        assert canary_paths(error, canary) == [], f"caller {i}"
    assert [a.status for a in attempts] == ["in_doubt"]
    with sqlite3.connect(tmp_path / "tb.db") as db:
        (raw_ct,) = db.execute(
            "SELECT raw_ct FROM tb_attempt WHERE id = ?", (attempts[0].id,)
        ).fetchone()
    assert (
        Keyring([Secret(KEY)]).decrypt(raw_ct, f"tb_attempt|{attempts[0].id}|raw".encode()) == body
    )


def test_job_and_reply_reprs_show_no_token() -> None:
    """A RefreshJob's repr hides the stale access token and a Reply's repr hides its body (both sit in
    frames an error reporter captures)."""
    from tokenbroker.engine.refresher import RefreshJob
    from tokenbroker.grants import Reply, RetryPolicy

    job = RefreshJob(
        "rt", "rt", "f", lambda rt: None, lambda g, p: None, RetryPolicy(), 1, 1, stale="AT_CANARY"
    )
    assert "AT_CANARY" not in repr(job)
    assert "RT_CANARY" not in repr(Reply(200, httpx.Headers(), b'{"refresh_token": "RT_CANARY"}'))


def clocked_job(clock: ManualClock, sends: list[int], **overrides: Any) -> Any:
    """A client-credentials RefreshJob whose send returns a 100 s token stamped by ``clock``."""
    from tokenbroker.core.token import Token
    from tokenbroker.engine.refresher import RefreshJob
    from tokenbroker.grants import Exchange, RetryPolicy, TokenResponse

    def send(grant: Any, policy: Any) -> Exchange:
        sends.append(1)
        token = Token(f"at-{len(sends)}", "Bearer", clock.time() + 100)
        return Exchange(response=TokenResponse(token=token, lifetime=100.0))

    fields: dict[str, Any] = {
        "row_id": "row",
        "provider": "cc",
        "fingerprint": "f",
        "build": lambda refresh_token: None,
        "send": send,
        "policy": RetryPolicy(deadline=5.0),
        "skew": 10.0,
        "lease_seconds": 20.0,
        **overrides,
    }
    return RefreshJob(**fields)


def test_stored_token_is_usable_by_the_injected_clock() -> None:
    """Whether a stored token is still usable is read from the injected clock: it is reused
    until the ManualClock reaches its expiry minus skew, then fetched again (1 send, then 2)."""
    from tokenbroker.engine.refresher import Refresher
    from tokenbroker.store.memory import MemoryStore

    clock = ManualClock()
    sends: list[int] = []
    refresher = Refresher(MemoryStore(Keyring([Secret(KEY)])), clock=clock, sleep=clock.sleep)
    assert refresher.run(clocked_job(clock, sends)).token.access_token == "at-1"
    clock.advance(89)
    assert refresher.run(clocked_job(clock, sends)).token.access_token == "at-1"
    assert len(sends) == 1
    clock.advance(1)
    assert refresher.run(clocked_job(clock, sends)).token.access_token == "at-2"
    assert len(sends) == 2


def test_waiting_for_a_held_lease_gives_up_on_the_injected_clock() -> None:
    """A live holder's lease is waited for until deadline + lease seconds have passed on the
    injected clock (its fake sleep advances it), then the caller fails without sending."""
    import time

    from tokenbroker.engine.refresher import Refresher
    from tokenbroker.store.memory import MemoryStore

    clock = ManualClock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.sleep(seconds)

    store = MemoryStore(Keyring([Secret(KEY)]))
    assert store.acquire("row", "cc", "elsewhere:1:x", 3600) is not None
    sends: list[int] = []
    started = time.monotonic()
    with pytest.raises(ProviderUnavailableError) as caught:
        Refresher(store, clock=clock, sleep=sleep).run(clocked_job(clock, sends))
    assert caught.value.sent is False
    assert sends == []
    assert 25.0 < sum(slept) < 25.2  # deadline 5 s + lease 20 s, in fake seconds
    assert time.monotonic() - started < 2.0  # and no real waiting
