"""ConsumerRegistry: keys, rules, and following the store's consumers while serving."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tokenbroker.config import ConsumerSettings
from tokenbroker.core.crypto import Keyring, generate_key
from tokenbroker.core.rules import parse_rule, subject_entry
from tokenbroker.core.secret import Secret
from tokenbroker.engine.consumers import Consumer, ConsumerRegistry, hash_key, new_key
from tokenbroker.errors import ForbiddenSubjectError, InvalidDelegationError, StoreError
from tokenbroker.store import Store, open_store

KEY = new_key()
CONFIGURED_KEY = new_key()
CONFIGURED = {"cfg": ConsumerSettings(api_key_sha256=hash_key(CONFIGURED_KEY), allow=("svc",))}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A file store."""
    opened = open_store(f"sqlite:///{tmp_path / 'tb.db'}", Keyring([Secret(generate_key())]))
    yield opened
    opened.close()


class Flaky:
    """A consumer source over a real store that fails (StoreError) while ``broken``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.broken = False
        self.failures = 0
        self.reads = 0

    def consumers_version(self) -> str:
        if self.broken:
            self.failures += 1
            raise StoreError("the store failed (OperationalError)")
        return self.store.consumers_version()

    def consumers(self) -> list[tuple[str, str, list[str]]]:
        self.reads += 1
        return self.store.consumers()


def test_reload_sees_consumers_added_and_removed_in_the_store(store: Store) -> None:
    """A loaded registry serves the store's consumers as of its last reload, re-reads the
    table only when consumers_version changed, and never drops configured consumers."""
    source = Flaky(store)
    registry = ConsumerRegistry.load(CONFIGURED, source)
    assert registry.authenticate(KEY) is None
    assert not registry.reload()
    assert source.reads == 1

    store.add_consumer("late", hash_key(KEY), ["svc:read"])
    assert registry.authenticate(KEY) is None  # not before a reload
    assert registry.reload()
    found = registry.authenticate(KEY)
    assert found is not None and found.name == "late" and found.allows("svc", ["read"])
    assert len(registry) == 2

    assert store.remove_consumer("late")
    assert registry.reload()
    assert registry.authenticate(KEY) is None
    assert registry.authenticate(CONFIGURED_KEY) is not None
    assert source.reads == 3


def test_a_stored_consumer_with_a_malformed_rule_is_refused_and_named(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored consumer whose rule does not parse is left out (logged by name); the others load."""
    store.add_consumer("broken", hash_key(KEY), ["Not A Rule!"])
    good = new_key()
    store.add_consumer("fine", hash_key(good), ["svc"])
    with caplog.at_level(logging.WARNING, logger="tokenbroker.consumers"):
        registry = ConsumerRegistry.load({}, store)
    assert registry.authenticate(KEY) is None
    assert registry.authenticate(good) is not None
    assert "stored consumer broken has a malformed allow rule" in caplog.text


def test_add_keeps_a_consumer_across_reloads(store: Store) -> None:
    """A consumer registered with add() is not dropped when the stored ones are re-read."""
    registry = ConsumerRegistry.load({}, store)
    registry.add("pinned", hash_key(KEY), [parse_rule("svc")])
    store.add_consumer("other", hash_key(new_key()), ["svc"])
    assert registry.reload()
    assert registry.authenticate(KEY) is not None


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_follow_tracks_the_store_and_rides_out_its_failures(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """follow() picks up an added consumer; while the store fails it logs once (by error
    class), keeps the last known consumers, and catches up with a removal once it answers."""
    source = Flaky(store)
    registry = ConsumerRegistry.load({}, source)

    async def scenario() -> None:
        task = asyncio.ensure_future(registry.follow(every=0.01))
        try:
            store.add_consumer("late", hash_key(KEY), ["svc"])
            await _until(lambda: registry.authenticate(KEY) is not None)
            source.broken = True
            store.remove_consumer("late")
            await _until(lambda: source.failures >= 3)
            assert registry.authenticate(KEY) is not None
            source.broken = False
            await _until(lambda: registry.authenticate(KEY) is None)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.INFO, logger="tokenbroker.consumers"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "tokenbroker.consumers"]
    assert messages == [
        "cannot re-read stored consumers: StoreError",
        "stored consumers are read again",
    ]


def test_a_registry_without_a_source_does_not_follow() -> None:
    """follow() on a fixed registry returns at once; reload() has nothing to do."""
    registry = ConsumerRegistry([("etl", hash_key(KEY), [parse_rule("svc")])])
    asyncio.run(asyncio.wait_for(registry.follow(every=0.01), 1))
    assert not registry.reload()
    assert registry.authenticate(KEY) is not None


def test_delegation_rules_are_a_permission_of_their_own() -> None:
    """`delegate:P` and `delegate-as:P` parse (and print) as delegation rules: they allow
    delegation for P but no token read, and a token rule allows no delegation; a delegation
    word without exactly one provider is malformed."""
    delegate, delegate_as, reader = (
        parse_rule(text) for text in ("delegate:svc", "delegate-as:svc", "svc")
    )
    assert (delegate.provider, delegate.action, str(delegate)) == (
        "svc",
        "delegate",
        "delegate:svc",
    )
    assert (delegate_as.action, str(delegate_as)) == ("delegate-as", "delegate-as:svc")
    both = Consumer("web", (delegate,))
    assert both.may_delegate("svc") and not both.allows("svc") and not both.allows("svc", ["read"])
    assert not both.may_delegate("other")
    assert not Consumer("etl", (reader,)).may_delegate("svc")
    assert Consumer("as", (delegate_as,)).may_delegate("svc")
    for bad in ("delegate", "delegate:", "delegate:a b", "delegate-as:Svc", "delegate:svc:x"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_subject_is_the_consumers_own_unless_delegate_as() -> None:
    """A consumer's delegation subject is its configured one, else its name; another subject
    needs delegate-as for that provider (ForbiddenSubjectError otherwise), and a malformed one
    is InvalidDelegationError."""
    rules = (parse_rule("delegate:svc"), parse_rule("delegate-as:other"))
    named = Consumer("web", rules, "portal")
    assert named.delegation_subject("svc") == "portal"
    assert named.delegation_subject("svc", "portal") == "portal"
    assert Consumer("web", rules).delegation_subject("svc") == "web"
    with pytest.raises(ForbiddenSubjectError):
        named.delegation_subject("svc", "admin")
    assert named.delegation_subject("other", "admin") == "admin"
    with pytest.raises(InvalidDelegationError):
        named.delegation_subject("other", "ad min")


def test_a_stored_subject_rides_in_the_allow_list(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """`subject=NAME` in a stored allow list is the consumer's subject (no store column); a
    stored list with two subjects or a malformed one is refused and logged by name; a config
    consumer's `subject` is its subject."""
    caplog.set_level(logging.WARNING, logger="tokenbroker.consumers")
    good, twice, bad = new_key(), new_key(), new_key()
    store.add_consumer("portal", hash_key(good), ["delegate:svc", subject_entry("alice")])
    store.add_consumer("twice", hash_key(twice), ["svc", "subject=a", "subject=b"])
    store.add_consumer("bad", hash_key(bad), ["svc", "subject=a b"])
    configured = {
        "cfg": ConsumerSettings(
            api_key_sha256=hash_key(CONFIGURED_KEY), allow=("delegate:svc",), subject="bob"
        )
    }
    registry = ConsumerRegistry.load(configured, store)
    portal = registry.authenticate(good)
    assert portal is not None and portal.subject == "alice"
    assert portal.delegation_subject("svc") == "alice" and not portal.allows("svc")
    assert registry.authenticate(twice) is None and registry.authenticate(bad) is None
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "twice" in warned and "bad" in warned
    cfg = registry.authenticate(CONFIGURED_KEY)
    assert cfg is not None and cfg.delegation_subject("svc") == "bob"
    with pytest.raises(InvalidDelegationError):
        subject_entry("a\nb")


def test_jobs_is_a_permission_word_not_a_provider() -> None:
    """The allow word jobs grants the jobs API and no token; it takes nothing after it, is
    listed as no provider, round-trips as text, and no provider may be called jobs."""
    from tokenbroker import parse_settings
    from tokenbroker.errors import ConfigError

    plain = Consumer("etl", (parse_rule("svc"),))
    ops = Consumer("ops", (parse_rule("svc"), parse_rule("jobs")))
    assert (plain.may_run_jobs(), ops.may_run_jobs()) == (False, True)
    assert ops.uses("svc") and not ops.uses("jobs") and not ops.allows("jobs")
    assert ops.providers() == ["svc"] and str(parse_rule("jobs")) == "jobs"
    with pytest.raises(ValueError, match="jobs"):
        parse_rule("jobs:svc")
    provider = "{grant: client_credentials, token_url: http://127.0.0.1/t, client_id: a, "
    config = f"providers:\n  jobs: {provider}client_secret: b}}\n"
    with pytest.raises(ConfigError, match="'jobs' is a word of allow rules"):
        parse_settings(config, {})
