"""Conformance: write-ahead attempts and commits.

The intent is recorded before the request; the raw reply is kept sealed; versions move on
once per applied refresh token; reseeding supersedes open attempts; ``states()`` shows no
secret.
"""

from __future__ import annotations

from tokenbroker.core.secret import Secret
from tokenbroker.core.token import Token
from tokenbroker.store import Store, StoredToken

from .fixtures import ConformanceBase, keyring, refresh, stored

__all__ = ["AttemptConformance"]


class AttemptConformance(ConformanceBase):
    """Write-ahead attempts, commits, reseeding and the plain state listing."""

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
