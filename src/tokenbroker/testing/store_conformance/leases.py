"""Conformance: leases and fencing (checklist D7/B7).

A stale fence changes nothing; leases expire and are taken over on the store's clock.
"""

from __future__ import annotations

import pytest

from tokenbroker.core.secret import Secret
from tokenbroker.store import Lease, Store

from .fixtures import ConformanceBase, stored, wait_until_expired

__all__ = ["LeaseConformance"]


class LeaseConformance(ConformanceBase):
    """Leases and fencing: who may write, decided by the fence."""

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
