"""One conformance suite for every store backend (:mod:`tokenbroker.store.base`).

Model: the ``limits`` library's ``all_storage`` tests. Subclass :class:`StoreConformance`
in a test module and provide a ``store_factory`` fixture returning a :class:`StoreFactory`
(parametrise it to run the suite against several backends)::

    @pytest.fixture(params=["sqlite-file", "memory"])
    def store_factory(request, tmp_path) -> StoreFactory: ...

    class TestStoreConformance(StoreConformance):
        \"\"\"Every guarantee of the store protocol, against every backend.\"\"\"

The suite proves the fenced protocol (checklist D7: a stale fence changes nothing), lease
expiry and takeover on the store's clock, write-ahead attempts, sealed raw replies,
consumers, signing keys, key rotation, schema versions, and encryption at rest (D6: a
ciphertext moved to another row, column or version fails to decrypt; no plaintext canary
in what the backend persists). It touches a backend's stored bytes only through the
documented :meth:`~tokenbroker.store.base.Store.raw` test hook. Needs pytest.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tokenbroker.errors import EncryptionKeyError, StoreCorruptError, StoreError
from tokenbroker.store import Lease, RawState, Store, StoredToken

from ..core.crypto import Keyring, generate_key
from ..core.secret import Secret
from ..core.token import Token

__all__ = ["StoreConformance", "StoreFactory", "keyring", "refresh", "stored"]


@dataclass(frozen=True)
class StoreFactory:
    """How the suite opens one backend.

    Attributes:
        name: The backend's name in test ids.
        open: Opens the store with a keyring; each call opens the *same* store again (another
            connection, or another process's view) when ``reopenable``.
        reopenable: Whether a second ``open`` sees what the first wrote (False for a SQLite
            ``:memory:`` database, which lives and dies with its one connection).
    """

    name: str
    open: Callable[[Keyring], Store]
    reopenable: bool = True


def keyring(*keys: str) -> Keyring:
    """A keyring of the given keys (the first encrypts)."""
    return Keyring([Secret(k) for k in keys])


def stored(access_token: str = "AT-1", *, lifetime: float = 3600.0, fp: str = "fp") -> StoredToken:
    """A stored access token issued now."""
    obtained = time.time()
    return StoredToken(
        token=Token(access_token, "Bearer", obtained + lifetime, "read write"),
        lifetime=lifetime,
        obtained_at=obtained,
        fingerprint=fp,
    )


def refresh(store: Store, row: str, owner: str, rt: str, at: str, raw: bytes = b"") -> Lease:
    """One whole refresh under a fresh lease: acquire, intent, commit, release."""
    lease = store.acquire(row, "prov", owner, 30)
    assert lease is not None
    attempt = store.begin_attempt(lease)
    assert store.commit(lease, attempt, stored(at), refresh_token=Secret(rt), raw=raw)
    store.release(lease)
    return lease


def wait_until_expired(store: Store, lease: Lease) -> None:
    """Poll the store's clock until it passes the lease's expiry (5 s deadline)."""
    deadline = time.monotonic() + 5
    while store.now() <= lease.expires_at:
        assert time.monotonic() < deadline, "the lease never expired by the store's clock"
        time.sleep(0.005)


_CRED = "tb_credential"


def _copy(column: str, source: str, target: str = "beta") -> Callable[[RawState], None]:
    return lambda raw: raw.write(_CRED, target, column, raw.read(_CRED, source, column))


def _move(source: str, target: str) -> Callable[[RawState], None]:
    return lambda raw: raw.write(_CRED, "beta", target, raw.read(_CRED, "beta", source))


def _shift(column: str, by: int) -> Callable[[RawState], None]:
    return lambda raw: raw.write(_CRED, "beta", column, raw.read(_CRED, "beta", column) + by)


_SWAPS = {
    "rt-other-row": _copy("rt_ct", "alpha"),
    "at-other-row": _copy("at_ct", "alpha"),
    "at-into-rt": _move("at_ct", "rt_ct"),
    "rt-into-at": _move("rt_ct", "at_ct"),
    "rt-version": _shift("rt_version", 1),
    "at-version": _shift("at_version", -1),
}


class StoreConformance:
    """The store protocol's guarantees; subclass it and provide a ``store_factory`` fixture."""

    @pytest.fixture
    def key(self) -> str:
        """A fresh encryption key."""
        return generate_key()

    @pytest.fixture
    def store(self, store_factory: StoreFactory, key: str) -> Iterator[Store]:
        """The backend, opened with ``key``."""
        opened = store_factory.open(keyring(key))
        yield opened
        opened.close()

    @staticmethod
    def _reopenable(factory: StoreFactory) -> None:
        if not factory.reopenable:
            pytest.skip(f"{factory.name} cannot be opened twice")

    # -- D7/B7: leases and fencing ---------------------------------------------------------------

    def test_acquire_returns_a_lease_and_excludes_others(self, store: Store) -> None:
        """The first owner gets a Lease with fence 1; a second owner gets None while it is held."""
        lease = store.acquire("c", "prov", "A", 30)
        assert isinstance(lease, Lease)
        assert (lease.id, lease.owner, lease.fence, lease.rt_version) == ("c", "A", 1, 0)
        assert lease.expires_at == pytest.approx(store.now() + 30, abs=2)
        assert store.acquire("c", "prov", "B", 30) is None
        row = store.load("c")
        assert row is not None
        assert (row.lease_owner, row.lease_fence, row.provider) == ("A", 1, "prov")

    def test_release_frees_the_lease_for_the_next_owner(self, store: Store) -> None:
        """After a release another owner acquires at once, with the next fence."""
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        store.release(lease)
        successor = store.acquire("c", "prov", "B", 30)
        assert successor is not None
        assert successor.fence == lease.fence + 1

    def test_expired_lease_goes_to_the_next_owner_with_a_higher_fence(self, store: Store) -> None:
        """Once the store's clock passes the lease's expiry, another owner takes it with fence+1."""
        old = store.acquire("c", "prov", "A", 0.05)
        assert old is not None
        assert store.acquire("c", "prov", "B", 30) is None
        wait_until_expired(store, old)
        new = store.acquire("c", "prov", "B", 30)
        assert new is not None
        assert new.fence == old.fence + 1
        assert store.acquire("c", "prov", "A", 30) is None

    def test_stale_holder_writes_change_nothing(self, store: Store) -> None:
        """Every write by a holder whose lease was taken over changes nothing; the successor's
        data stays."""
        seeded = store.acquire("c", "prov", "seed", 30)
        assert seeded is not None
        seeded_lease = store.reseed(seeded, Secret("RT-0"), "digest-0")
        assert seeded_lease is not None
        store.release(seeded_lease)

        old = store.acquire("c", "prov", "A", 0.05)
        assert old is not None
        old_attempt = store.begin_attempt(old)
        assert old_attempt is not None
        wait_until_expired(store, old)
        new = store.acquire("c", "prov", "B", 30)
        assert new is not None
        assert new.rt_version == old.rt_version  # only the fence tells them apart

        assert store.begin_attempt(old) is None
        assert store.set_state(old, "reauthorization_required", "Stale") is False
        assert store.reseed(old, Secret("RT-stale-seed"), "digest-stale") is None
        store.finish_attempt(
            old, old_attempt, status="failed", state="reauthorization_required", error="Stale"
        )
        store.release(old)
        row = store.load("c")
        assert row is not None
        assert (row.state, row.last_error, row.seed_digest) == ("refreshing", None, "digest-0")
        assert (row.lease_owner, row.lease_fence) == ("B", new.fence)
        assert row.refresh_token == Secret("RT-0")

        new_attempt = store.begin_attempt(new)
        assert new_attempt is not None
        assert store.commit(new, new_attempt, stored("AT-new"), refresh_token=Secret("RT-new"))
        assert not store.commit(old, old_attempt, stored("AT-old"), refresh_token=Secret("RT-old"))

        row = store.load("c")
        assert row is not None
        assert row.token is not None
        assert row.token.token.access_token == "AT-new"
        assert row.refresh_token == Secret("RT-new")
        assert row.rt_version == new.rt_version + 1
        statuses = {a.id: a.status for a in store.attempts("c")}
        assert statuses[old_attempt] == "orphaned"
        assert statuses[new_attempt] == "succeeded"

    def test_stale_commit_before_the_successor_writes_is_orphaned(self, store: Store) -> None:
        """A stale commit is rejected by the fence alone (same rt_version); kept 'orphaned'."""
        old = store.acquire("c", "prov", "A", 0.05)
        assert old is not None
        attempt = store.begin_attempt(old)
        wait_until_expired(store, old)
        assert store.acquire("c", "prov", "B", 30) is not None
        assert not store.commit(old, attempt, stored("AT-old"), refresh_token=Secret("RT-old"))
        row = store.load("c")
        assert row is not None
        assert (row.token, row.refresh_token, row.rt_version) == (None, None, 0)
        assert [a.status for a in store.attempts("c")] == ["orphaned"]

    def test_commit_with_a_stale_version_updates_nothing(self, store: Store) -> None:
        """A commit whose fence matches but whose refresh-token version moved on is orphaned."""
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        attempt = store.begin_attempt(lease)
        assert store.commit(lease, attempt, stored("AT-1"), refresh_token=Secret("RT-1"))
        assert not store.commit(lease, None, stored("AT-again"), refresh_token=Secret("RT-again"))
        row = store.load("c")
        assert row is not None and row.token is not None
        assert (row.token.token.access_token, row.refresh_token) == ("AT-1", Secret("RT-1"))
        assert row.rt_version == 1

    def test_overrun_lease_nobody_took_still_commits(self, store: Store) -> None:
        """The fence decides, not the clock: an expired lease nobody took still commits."""
        lease = store.acquire("c", "prov", "A", 0.05)
        assert lease is not None
        attempt = store.begin_attempt(lease)
        wait_until_expired(store, lease)
        assert store.commit(lease, attempt, stored("AT-late"), refresh_token=Secret("RT-late"))
        assert [a.status for a in store.attempts("c")] == ["succeeded"]

    def test_stale_close_attempts_changes_nothing(self, store: Store) -> None:
        """A holder fenced out cannot resolve (close) the credential's open attempts (D7)."""
        first = store.acquire("c", "prov", "A", 30)
        assert first is not None
        in_doubt = store.begin_attempt(first)
        assert in_doubt is not None
        store.finish_attempt(first, in_doubt, status="in_doubt", state="in_doubt", error="Timeout")
        store.release(first)
        old = store.acquire("c", "prov", "A", 0.05)
        assert old is not None
        wait_until_expired(store, old)
        current = store.acquire("c", "prov", "B", 30)
        assert current is not None
        assert store.close_attempts(old, [in_doubt], "superseded") is False
        assert [a.status for a in store.open_attempts("c")] == ["in_doubt"]
        assert store.close_attempts(current, [in_doubt], "superseded") is True
        assert store.open_attempts("c") == []

    def test_steal_from_takes_over_immediately(self, store: Store) -> None:
        """steal_from=<holder> takes a live lease at once with fence+1; a wrong name does not."""
        held = store.acquire("c", "prov", "dead-process", 30)
        assert held is not None
        assert store.acquire("c", "prov", "B", 30, steal_from="someone-else") is None
        stolen = store.acquire("c", "prov", "B", 30, steal_from="dead-process")
        assert stolen is not None
        assert stolen.fence == held.fence + 1
        assert store.set_state(held, "active") is False

    def test_acquire_keeps_scope_and_account_in_plain_state(self, store: Store) -> None:
        """acquire records scope and account for status; acquiring without them keeps them."""
        lease = store.acquire("c", "prov", "A", 30, scope="read", account="alice")
        assert lease is not None
        store.release(lease)
        assert store.acquire("c", "prov", "A", 30) is not None
        (state,) = store.states()
        assert (state["scope"], state["account"], state["provider"]) == ("read", "alice", "prov")

    # -- write-ahead attempts and commits --------------------------------------------------------

    def test_commit_stores_the_reply_sealed_and_applies_tokens(
        self, store: Store, key: str
    ) -> None:
        """One commit: raw reply kept sealed on the attempt, tokens applied, version +1,
        'succeeded'."""
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        attempt = store.begin_attempt(lease)
        assert attempt is not None
        assert store.attempts("c")[0].status == "intent"
        assert store.load("c").state == "refreshing"  # type: ignore[union-attr]
        raw = b'{"access_token":"AT-1","refresh_token":"RT-1"}'
        assert store.commit(lease, attempt, stored("AT-1"), refresh_token=Secret("RT-1"), raw=raw)
        row = store.load("c")
        assert row is not None
        assert (row.rt_version, row.state, row.last_error) == (1, "active", None)
        assert row.refresh_token == Secret("RT-1")
        hook = store.raw()
        status = hook.read("tb_attempt", attempt, "status")
        to_version = hook.read("tb_attempt", attempt, "to_version")
        raw_ct = hook.read("tb_attempt", attempt, "raw_ct")
        assert (status, to_version) == ("succeeded", 1)
        assert b"AT-1" not in raw_ct
        assert keyring(key).decrypt(raw_ct, f"tb_attempt|{attempt}|raw".encode()) == raw

    def test_failed_attempt_records_its_outcome(self, store: Store) -> None:
        """finish_attempt stores the status, the row's state and last error, under the fence."""
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        attempt = store.begin_attempt(lease, recovery=True)
        store.finish_attempt(
            lease, attempt, status="in_doubt", state="in_doubt", error="Timeout", raw=b"x"
        )
        (recorded,) = store.attempts("c")
        assert (recorded.status, recorded.recovery, recorded.fence) == ("in_doubt", True, 1)
        assert [a.id for a in store.open_attempts("c")] == [attempt]
        row = store.load("c")
        assert row is not None
        assert (row.state, row.last_error) == ("in_doubt", "Timeout")
        assert store.set_state(lease, "reauthorization_required", "InvalidGrant")
        assert store.load("c").state == "reauthorization_required"  # type: ignore[union-attr]

    def test_attempt_ids_are_never_reused(self, store: Store) -> None:
        """Attempt ids grow across credentials: an id names one attempt for ever."""
        refresh(store, "a", "A", "RT-a", "AT-a")
        refresh(store, "b", "A", "RT-b", "AT-b")
        refresh(store, "a", "A", "RT-a2", "AT-a2")
        ids = [a.id for a in store.attempts("a")] + [a.id for a in store.attempts("b")]
        assert len(set(ids)) == 3
        assert [a.from_version for a in store.attempts("a")] == [0, 1]

    def test_reply_without_new_refresh_token_still_bumps_the_version(self, store: Store) -> None:
        """Passing the presented refresh token again (no rotation) still moves rt_version on."""
        refresh(store, "c", "A", "RT-same", "AT-1")
        refresh(store, "c", "A", "RT-same", "AT-2")
        row = store.load("c")
        assert row is not None
        assert row.rt_version == 2
        assert row.refresh_token == Secret("RT-same")
        assert row.token is not None
        assert row.token.token.access_token == "AT-2"

    def test_commit_without_refresh_token_keeps_the_version(self, store: Store) -> None:
        """A client-credentials commit (no refresh token, no attempt) replaces the AT, not
        rt_version."""
        for access in ("AT-1", "AT-2"):
            lease = store.acquire("c", "prov", "A", 30)
            assert lease is not None
            assert store.commit(lease, None, stored(access))
            store.release(lease)
        row = store.load("c")
        assert row is not None
        assert (row.rt_version, row.refresh_token) == (0, None)
        assert row.token is not None
        assert row.token.token.access_token == "AT-2"
        assert store.attempts("c") == []

    def test_load_round_trips_every_token_field(self, store: Store) -> None:
        """load() gives back access token, type, scope, expiry, lifetime, obtained_at and
        fingerprint."""
        token = StoredToken(
            token=Token("AT-é-∑", "DPoP", 1_900_000_123.5, "read write:all"),
            lifetime=1234.5,
            obtained_at=1_899_998_889.0,
            fingerprint="0123456789abcdef",
        )
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        assert store.commit(lease, None, token, refresh_token=Secret("RT-x"), seed_digest="d1")
        row = store.load("c")
        assert row is not None
        assert row.token is not None
        got = row.token
        assert (got.token.access_token, got.token.token_type) == ("AT-é-∑", "DPoP")
        assert (got.token.scope, got.token.expires_at) == ("read write:all", 1_900_000_123.5)
        assert (got.lifetime, got.obtained_at, got.fingerprint) == (
            1234.5,
            1_899_998_889.0,
            "0123456789abcdef",
        )
        assert (row.seed_digest, row.last_refresh) == ("d1", 1_899_998_889.0)
        assert store.load("missing") is None

    def test_reseed_replaces_the_refresh_token_and_supersedes_open_attempts(
        self, store: Store
    ) -> None:
        """reseed stores the new seed at version+1, drops the AT and closes open attempts."""
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        assert store.commit(lease, None, stored("AT-1"), refresh_token=Secret("RT-1"))
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        attempt = store.begin_attempt(lease)
        store.finish_attempt(lease, attempt, status="in_doubt", state="in_doubt", error="Timeout")
        reseeded = store.reseed(lease, Secret("RT-seed"), "digest-2")
        assert reseeded is not None
        assert reseeded.rt_version == lease.rt_version + 1
        row = store.load("c")
        assert row is not None
        assert (row.token, row.refresh_token, row.seed_digest) == (
            None,
            Secret("RT-seed"),
            "digest-2",
        )
        assert (row.state, row.rt_version) == ("active", 2)
        assert store.open_attempts("c") == []
        assert [a.status for a in store.attempts("c")] == ["superseded"]

    def test_states_show_no_secret(self, store: Store) -> None:
        """states() lists non-secret columns only: no token value appears anywhere in it."""
        refresh(store, "c", "A", "CANARY_RT_states", "CANARY_AT_states")
        states = store.states()
        assert [s["id"] for s in states] == ["c"]
        assert states[0]["rt_version"] == 1
        assert "CANARY" not in repr(states)
        assert "CANARY" not in repr(store.load("c"))

    def test_states_are_ordered_by_provider_account_scope(self, store: Store) -> None:
        """states() orders by provider, account, scope, id, a missing value first."""
        for row_id, provider, account in [("4", "b", None), ("3", "a", "z"), ("2", "a", None)]:
            assert store.acquire(row_id, provider, "A", 30, scope="s", account=account)
        assert store.acquire("1", "a", "A", 30) is not None
        assert [s["id"] for s in store.states()] == ["1", "2", "3", "4"]

    # -- consumers and signing keys --------------------------------------------------------------

    def test_consumers_add_list_remove(self, store: Store) -> None:
        """Consumers are listed by name with their rules; a duplicate changes nothing."""
        store.add_consumer("etl", "a" * 64, ["svc", "tdx:read"])
        store.add_consumer("batch", "b" * 64, ["svc"])
        marker = store.consumers_version()
        with pytest.raises(StoreError, match="etl"):
            store.add_consumer("etl", "c" * 64, ["other"])
        with pytest.raises(StoreError):
            store.add_consumer("other", "a" * 64, ["other"])
        assert store.consumers_version() == marker
        assert store.consumers() == [
            ("batch", "b" * 64, ["svc"]),
            ("etl", "a" * 64, ["svc", "tdx:read"]),
        ]
        assert store.remove_consumer("etl")
        assert not store.remove_consumer("etl")
        assert store.consumers() == [("batch", "b" * 64, ["svc"])]

    def test_consumers_version_changes_with_each_stored_change_and_only_then(
        self, store_factory: StoreFactory, store: Store, key: str
    ) -> None:
        """Adding and removing a consumer give consumers_version a new value that another
        connection (another process) sees; a refused add or a remove of nobody leaves it."""
        self._reopenable(store_factory)
        other = store_factory.open(keyring(key))
        try:
            seen = [other.consumers_version()]
            store.add_consumer("etl", "a" * 64, ["svc"])
            seen.append(other.consumers_version())
            with pytest.raises(StoreError):
                store.add_consumer("etl", "b" * 64, ["svc"])
            assert not store.remove_consumer("nobody")
            assert other.consumers_version() == seen[-1]
            assert store.remove_consumer("etl")
            seen.append(other.consumers_version())
        finally:
            other.close()
        assert len(set(seen)) == 3

    def test_signing_keys_are_sealed_newest_first_and_never_replaced(self, store: Store) -> None:
        """Signing keys come back newest first per algorithm; adding a kid again keeps the first."""
        added = store.now()
        store.add_signing_key("k1", "EdDSA", b"PEM-CANARY-1")
        deadline = time.monotonic() + 5
        while store.now() < added + 0.01:  # the next key's created_at must be later
            assert time.monotonic() < deadline, "the store's clock did not move"
            time.sleep(0.002)
        store.add_signing_key("k2", "EdDSA", b"PEM-2")
        store.add_signing_key("k1", "EdDSA", b"PEM-replaced")
        store.add_signing_key("p1", "ES256", b"PEM-p")
        assert store.signing_keys("EdDSA") == [("k2", b"PEM-2"), ("k1", b"PEM-CANARY-1")]
        assert store.signing_keys("ES256") == [("p1", b"PEM-p")]
        assert b"PEM-CANARY" not in store.raw().read("tb_signing_key", "k1", "private_ct")

    # -- D6: encryption at rest ------------------------------------------------------------------

    @pytest.mark.parametrize("swap", list(_SWAPS))
    def test_moved_ciphertext_fails_to_decrypt(self, store: Store, swap: str) -> None:
        """A ciphertext moved to another row, column or version is StoreCorruptError on load."""
        refresh(store, "alpha", "A", "RT-alpha-1", "AT-alpha-1")
        refresh(store, "beta", "A", "RT-beta-1", "AT-beta-1")
        _SWAPS[swap](store.raw())
        with pytest.raises(StoreCorruptError) as excinfo:
            store.load("beta")
        assert "RT-" not in str(excinfo.value)
        assert store.load("alpha") is not None

    def test_rolled_back_refresh_token_fails_to_decrypt(self, store: Store) -> None:
        """Putting back an older refresh-token ciphertext under the current version is refused."""
        refresh(store, "c", "A", "RT-1", "AT-1")
        old_ct = store.raw().read(_CRED, "c", "rt_ct")
        refresh(store, "c", "A", "RT-2", "AT-2")
        store.raw().write(_CRED, "c", "rt_ct", old_ct)
        with pytest.raises(StoreCorruptError):
            store.load("c")

    def test_corrupted_ciphertext_is_store_corrupt(self, store: Store) -> None:
        """Random bytes in rt_ct make load() raise StoreCorruptError; states() still works."""
        refresh(store, "c", "A", "RT-1", "AT-1")
        refresh(store, "d", "A", "RT-d", "AT-d")
        store.raw().write(_CRED, "c", "rt_ct", b"\x7f" + b"\x5a" * 80)
        with pytest.raises(StoreCorruptError):
            store.load("c")
        assert store.load("d") is not None
        assert [s["id"] for s in store.states()] == ["c", "d"]

    def test_tampered_ciphertext_byte_is_store_corrupt(self, store: Store) -> None:
        """One flipped bit in a stored ciphertext is StoreCorruptError, never a wrong token."""
        refresh(store, "c", "A", "RT-1", "AT-1")
        flipped = bytearray(store.raw().read(_CRED, "c", "at_ct"))
        flipped[-1] ^= 0x01
        store.raw().write(_CRED, "c", "at_ct", bytes(flipped))
        with pytest.raises(StoreCorruptError):
            store.load("c")

    def test_no_plaintext_canary_in_what_the_backend_persists(self, store: Store) -> None:
        """After commits carrying canaries, no canary appears in the backend's persisted bytes."""
        canaries = [f"CANARY_{kind}_{uuid.uuid4().hex}" for kind in ("AT", "RT", "SEED", "RAW")]
        at, rt, seed, raw = canaries
        lease = store.acquire("c", "prov", "A", 30)
        assert lease is not None
        lease = store.reseed(lease, Secret(seed), "digest")
        assert lease is not None
        attempt = store.begin_attempt(lease)
        body = f'{{"access_token":"{at}","refresh_token":"{rt}","x":"{raw}"}}'.encode()
        assert store.commit(lease, attempt, stored(at), refresh_token=Secret(rt), raw=body)
        store.add_signing_key("kid", "EdDSA", f"PEM {seed}".encode())
        data = store.raw().persisted()
        assert b"digest" in data  # the hook does show what the backend keeps
        for canary in canaries:
            assert canary.encode() not in data, canary

    # -- D6: keys and rotation -------------------------------------------------------------------

    def test_wrong_key_fails_closed_at_open(self, store_factory: StoreFactory, key: str) -> None:
        """Reopening sealed rows with only an unrelated key is EncryptionKeyError naming the key
        id, never a key or a token."""
        self._reopenable(store_factory)
        new = generate_key()
        store = store_factory.open(keyring(key))
        refresh(store, "c", "A", "RT-1", "AT-1")
        try:
            with pytest.raises(EncryptionKeyError) as excinfo:
                store_factory.open(keyring(new))
        finally:
            store.close()
        message = str(excinfo.value)
        assert keyring(key).primary_id in message
        assert key not in message
        assert new not in message
        assert "RT-1" not in message

    def test_empty_store_opens_with_any_key(self, store_factory: StoreFactory) -> None:
        """A store holding no secrets yet does not pin a key."""
        self._reopenable(store_factory)
        first = store_factory.open(keyring(generate_key()))
        try:
            store_factory.open(keyring(generate_key())).close()
        finally:
            first.close()

    def test_key_rotation_re_encrypts_everything(self, store_factory: StoreFactory) -> None:
        """With [new, old] the store opens, rotate_keys re-encrypts all, then [new] alone suffices
        and [old] alone no longer opens it."""
        self._reopenable(store_factory)
        old, new = generate_key(), generate_key()
        first = store_factory.open(keyring(old))
        try:
            refresh(first, "c", "A", "RT-1", "AT-1", raw=b"reply-1")
            first.add_signing_key("kid", "EdDSA", b"PEM")
            both = store_factory.open(keyring(new, old))
            try:
                assert both.rotate_keys() == 4  # at_ct, rt_ct, raw_ct, private_ct
                assert both.rotate_keys() == 0
                refresh(both, "c", "A", "RT-2", "AT-2", raw=b"reply-2")
                hook = both.raw()
                blobs = [hook.read(_CRED, "c", "at_ct"), hook.read(_CRED, "c", "rt_ct")]
                blobs += [hook.read("tb_signing_key", "kid", "private_ct")]
                blobs += [hook.read("tb_attempt", a.id, "raw_ct") for a in both.attempts("c")]
            finally:
                both.close()
            assert {Keyring.key_id(b).hex() for b in blobs} == {keyring(new).primary_id}
            only_new = store_factory.open(keyring(new))
            try:
                row = only_new.load("c")
                assert only_new.signing_keys("EdDSA") == [("kid", b"PEM")]
            finally:
                only_new.close()
            assert row is not None and row.token is not None
            assert row.refresh_token == Secret("RT-2")
            assert row.token.token.access_token == "AT-2"
            with pytest.raises(EncryptionKeyError):
                store_factory.open(keyring(old))
        finally:
            first.close()

    def test_rotation_keeps_the_same_tokens(self, store_factory: StoreFactory) -> None:
        """rotate_keys changes ciphertexts only: load() returns the very same tokens afterwards."""
        self._reopenable(store_factory)
        old, new = generate_key(), generate_key()
        first = store_factory.open(keyring(old))
        try:
            refresh(first, "c", "A", "RT-1", "AT-1")
            both = store_factory.open(keyring(new, old))
            try:
                assert both.rotate_keys() == 3  # at_ct, rt_ct and the attempt's (empty) raw_ct
            finally:
                both.close()
            only_new = store_factory.open(keyring(new))
            try:
                row = only_new.load("c")
            finally:
                only_new.close()
        finally:
            first.close()
        assert row is not None
        assert row.refresh_token == Secret("RT-1")
        assert row.token is not None
        assert row.token.token.access_token == "AT-1"
        assert row.rt_version == 1

    # -- several connections, schema versions ----------------------------------------------------

    def test_two_stores_on_one_backend_see_each_other(
        self, store_factory: StoreFactory, key: str
    ) -> None:
        """Two stores opened on one backend (two processes) share commits, leases and fences."""
        self._reopenable(store_factory)
        one = store_factory.open(keyring(key))
        two = store_factory.open(keyring(key))
        try:
            lease = one.acquire("c", "prov", "one", 30)
            assert lease is not None
            assert two.acquire("c", "prov", "two", 30) is None
            attempt = one.begin_attempt(lease)
            assert one.commit(lease, attempt, stored("AT-one"), refresh_token=Secret("RT-one"))
            row = two.load("c")
            assert row is not None
            assert row.refresh_token == Secret("RT-one")
            assert (row.lease_owner, row.rt_version) == ("one", 1)
            one.release(lease)
            taken = two.acquire("c", "prov", "two", 30)
            assert taken is not None
            assert (taken.fence, taken.rt_version) == (lease.fence + 1, 1)
            assert not one.commit(lease, None, stored("AT-stale"), refresh_token=Secret("RT-stale"))
            assert one.load("c").lease_owner == "two"  # type: ignore[union-attr]
        finally:
            one.close()
            two.close()

    def test_reopening_keeps_the_data(self, store_factory: StoreFactory, key: str) -> None:
        """Opening the same store again (a migration run on a current schema) keeps every row."""
        self._reopenable(store_factory)
        first = store_factory.open(keyring(key))
        try:
            refresh(first, "c", "me", "RT-1", "AT-1")
            first.add_consumer("etl", "a" * 64, ["svc"])
            second = store_factory.open(keyring(key))
            try:
                row = second.load("c")
                assert row is not None and row.refresh_token == Secret("RT-1")
                assert len(second.attempts("c")) == 1
                assert [c[0] for c in second.consumers()] == ["etl"]
            finally:
                second.close()
        finally:
            first.close()

    def test_newer_schema_is_refused(self, store_factory: StoreFactory, key: str) -> None:
        """A store written by a newer tokenbroker (schema 99) is refused with a StoreError naming
        it, and left as it is."""
        self._reopenable(store_factory)
        store = store_factory.open(keyring(key))
        try:
            store.raw().write("tb_meta", "schema_version", "value", "99")
            with pytest.raises(StoreError, match="schema version 99"):
                store_factory.open(keyring(key))
            assert store.raw().read("tb_meta", "schema_version", "value") == "99"
        finally:
            store.close()
