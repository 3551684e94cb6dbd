"""Conformance: jobs (issue 16) — idempotent add, pagination, fenced job leases, cancel
semantics, numbered events, pruning, schedule claims, and row-by-row key rotation.

A stale owner's save, heartbeat and event append change nothing; a queued job is canceled
at once and a running one only asks its owner to stop; of N racing schedule claims exactly
one wins.
"""

from __future__ import annotations

import threading
import time

import pytest

from tokenbroker.core.crypto import generate_key
from tokenbroker.core.secret import Secret
from tokenbroker.errors import EncryptionKeyError, StoreError
from tokenbroker.store import JobLease, Store

from .fixtures import ConformanceBase, StoreFactory, keyring, refresh

__all__ = ["JobConformance"]

_CANCELED = ("canceled", '{"status":"canceled"}')


def _add(store: Store, job_id: str, key: str | None = None, kind: str = "warm") -> None:
    row, cached = store.add_job(job_id, kind, key or f"k-{job_id}", "ops", "{}", time.time())
    assert not cached and row.id == job_id


def _wait_expired(store: Store, lease: JobLease) -> None:
    """Poll the store's clock past the job lease's expiry (5 s deadline)."""
    deadline = time.monotonic() + 5
    while store.now() <= lease.expires_at:
        assert time.monotonic() < deadline, "the job lease never expired by the store's clock"
        time.sleep(0.005)


class JobConformance(ConformanceBase):
    """Jobs: the store decides who runs a job, and a stale owner writes nothing."""

    def test_add_job_is_idempotent_while_active(self, store: Store) -> None:
        """The same key while queued/running/canceling returns that job (cached); after it
        finished, a new job is added."""
        first, cached = store.add_job("j1", "warm", "key", "ops", '{"p":1}', 1.0)
        assert (first.status, first.fence, first.last_event, cached) == ("queued", 0, 0, False)
        again, cached = store.add_job("j2", "warm", "key", "etl", "{}", 2.0)
        assert (again.id, cached) == ("j1", True)
        lease = store.claim_job("j1", "A", 30)
        assert lease is not None
        store.cancel_job("j1", _CANCELED)
        assert store.add_job("j3", "warm", "key", "ops", "{}", 3.0)[0].id == "j1"
        assert store.save_job(lease, "canceled", "{}") is not None
        fresh, cached = store.add_job("j4", "warm", "key", "ops", "{}", 4.0)
        assert (fresh.id, cached) == ("j4", False)
        assert store.job("j2") is None and store.job("j3") is None

    def test_add_job_refuses_a_taken_id(self, store: Store) -> None:
        """A job id that exists already is a StoreError and changes nothing."""
        _add(store, "j1")
        with pytest.raises(StoreError):
            store.add_job("j1", "refresh", "other", "ops", '{"x":1}', 1.0)
        row = store.job("j1")
        assert row is not None and (row.kind, row.document) == ("warm", "{}")

    def test_unknown_job_is_none(self, store: Store) -> None:
        """An unknown id reads as None, cancels as None, claims as None, has no events."""
        assert store.job("nope") is None
        assert store.cancel_job("nope", _CANCELED) is None
        assert store.claim_job("nope", "A", 30) is None
        assert store.job_events("nope") == []
        assert store.append_job_event("nope", "x", "{}") is None

    def test_jobs_are_listed_newest_first_with_filters_and_a_cursor(self, store: Store) -> None:
        """Pages of 2 walk every job newest first exactly once; filters and oldest_first hold."""
        for n in range(5):
            _add(store, f"j{n}", kind="warm" if n % 2 else "refresh")
        assert store.claim_job("j0", "A", 30) is not None
        seen, cursor = [], None
        while True:
            page = store.jobs(limit=2, cursor=cursor)
            seen += [r.id for r in page.rows]
            cursor = page.cursor
            if cursor is None:
                break
        assert seen == ["j4", "j3", "j2", "j1", "j0"]
        assert [r.id for r in store.jobs(kind="warm").rows] == ["j3", "j1"]
        assert [r.id for r in store.jobs(statuses=["running"]).rows] == ["j0"]
        queued = store.jobs(statuses=["queued"], oldest_first=True, limit=3)
        assert [r.id for r in queued.rows] == ["j1", "j2", "j3"]
        assert [r.id for r in store.jobs(oldest_first=True, cursor=queued.cursor).rows] == ["j4"]
        for bad in ("x", "-1", "0", "1.5"):
            with pytest.raises(ValueError):
                store.jobs(cursor=bad)
        with pytest.raises(ValueError):
            store.jobs(limit=0)

    def test_claim_moves_queued_to_running_once(self, store: Store) -> None:
        """The first claim wins (fence 1, running); a second claim of a live lease gets None."""
        _add(store, "j")
        lease = store.claim_job("j", "A", 30)
        assert lease is not None and (lease.owner, lease.fence) == ("A", 1)
        assert lease.expires_at == pytest.approx(store.now() + 30, abs=2)
        assert store.claim_job("j", "B", 30) is None
        row = store.job("j")
        assert row is not None
        assert (row.status, row.owner, row.fence) == ("running", "A", 1)
        assert row.heartbeat_at is not None

    def test_racing_claims_have_one_winner(self, store_factory: StoreFactory, key: str) -> None:
        """Eight threads on their own connections claim one queued job: exactly one wins."""
        self._reopenable(store_factory)
        stores = [store_factory.open(keyring(key)) for _ in range(8)]
        try:
            _add(stores[0], "j")
            barrier, wins = threading.Barrier(8), []

            def claim(n: int) -> None:
                barrier.wait()
                if stores[n].claim_job("j", f"owner-{n}", 30) is not None:
                    wins.append(n)

            threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(wins) == 1
        finally:
            for s in stores:
                s.close()

    def test_stale_owner_changes_nothing(self, store: Store) -> None:
        """After a takeover of an expired lease, the old owner's heartbeat, save and append
        are refused and the new owner's data stays."""
        _add(store, "j")
        old = store.claim_job("j", "A", 0.05)
        assert old is not None
        assert store.append_job_event("j", "phase_update", '{"n":1}', lease=old) == 1
        assert store.claim_job("j", "B", 30) is None
        _wait_expired(store, old)
        assert [r.id for r in store.expired_jobs()] == ["j"]
        new = store.claim_job("j", "B", 30)
        assert new is not None and new.fence == old.fence + 1
        assert store.expired_jobs() == []
        assert store.save_job(new, "running", '{"by":"B"}') is not None
        assert store.heartbeat_job(old, 30) is None
        assert store.save_job(old, "done", '{"by":"A"}', [("completed", "{}")]) is None
        assert store.append_job_event("j", "phase_update", '{"n":2}', lease=old) is None
        assert store.append_job_event("j", "phase_update", "{}") is None  # owned: lease needed
        row = store.job("j")
        assert row is not None
        assert (row.status, row.owner, row.document, row.last_event) == (
            "running",
            "B",
            '{"by":"B"}',
            1,
        )
        assert [e.data for e in store.job_events("j")] == ['{"n":1}']

    def test_heartbeat_renews_the_lease_on_the_store_clock(self, store: Store) -> None:
        """A heartbeat moves the expiry on, so the job is not reaped while it beats."""
        _add(store, "j")
        lease = store.claim_job("j", "A", 0.3)
        assert lease is not None
        row = store.heartbeat_job(lease, 30)
        assert row is not None and row.lease_expires_at is not None
        assert row.lease_expires_at == pytest.approx(store.now() + 30, abs=2)
        assert store.claim_job("j", "B", 30) is None
        assert store.expired_jobs() == []

    def test_save_final_stamps_finished_and_frees_the_lease(self, store: Store) -> None:
        """A final save writes document and events together, stamps finished_at, drops the owner;
        afterwards nothing (save, claim, heartbeat) changes the job."""
        _add(store, "j")
        lease = store.claim_job("j", "A", 30)
        assert lease is not None
        row = store.save_job(
            lease, "partial", '{"done":true}', [("item_failed", "{}"), ("completed", "{}")]
        )
        assert row is not None
        assert (row.status, row.owner, row.lease_expires_at, row.last_event) == (
            "partial",
            None,
            None,
            2,
        )
        assert row.finished_at == pytest.approx(store.now(), abs=2)
        assert store.save_job(lease, "running", "{}") is None
        assert store.heartbeat_job(lease, 30) is None
        assert store.claim_job("j", "B", 30) is None
        assert [(e.seq, e.name) for e in store.job_events("j")] == [
            (1, "item_failed"),
            (2, "completed"),
        ]

    def test_save_to_queued_releases_for_another_claim(self, store: Store) -> None:
        """Saving ``queued`` gives the job back: another owner claims it with the next fence."""
        _add(store, "j")
        lease = store.claim_job("j", "A", 30)
        assert lease is not None
        assert store.save_job(lease, "queued", '{"resume":true}') is not None
        again = store.claim_job("j", "B", 30)
        assert again is not None and again.fence == lease.fence + 1

    def test_cancel_semantics(self, store: Store) -> None:
        """Queued → canceled at once with its final event; running → canceling, which a
        ``running`` save keeps; the owner then ends it; a final job is left alone."""
        _add(store, "q")
        row = store.cancel_job("q", _CANCELED)
        assert row is not None and (row.status, row.last_event) == ("canceled", 1)
        assert row.finished_at is not None
        assert store.claim_job("q", "A", 30) is None

        _add(store, "r")
        lease = store.claim_job("r", "A", 30)
        assert lease is not None
        row = store.cancel_job("r", _CANCELED)
        assert row is not None and (row.status, row.last_event, row.owner) == ("canceling", 0, "A")
        saved = store.save_job(lease, "running", '{"progress":50}')
        assert saved is not None and saved.status == "canceling"
        beat = store.heartbeat_job(lease, 30)
        assert beat is not None and beat.status == "canceling"
        ended = store.save_job(lease, "canceled", "{}", [_CANCELED])
        assert ended is not None and ended.status == "canceled"
        again = store.cancel_job("r", _CANCELED)
        assert again is not None and (again.status, again.last_event) == ("canceled", 1)

    def test_events_are_numbered_and_read_after_a_sequence(self, store: Store) -> None:
        """Events get 1, 2, 3 … per job; job_events(after=n) returns exactly those after n."""
        _add(store, "a")
        _add(store, "b")
        la, lb = store.claim_job("a", "A", 30), store.claim_job("b", "A", 30)
        assert la is not None and lb is not None
        seqs = [
            store.append_job_event("a", "phase_update", f'{{"n":{n}}}', lease=la) for n in range(5)
        ]
        assert seqs == [1, 2, 3, 4, 5]
        assert store.append_job_event("b", "phase_update", "{}", lease=lb) == 1
        assert [e.seq for e in store.job_events("a", after=2)] == [3, 4, 5]
        assert [e.data for e in store.job_events("a", after=3, limit=1)] == ['{"n":3}']
        assert store.job_events("a", after=5) == []
        row = store.job("a")
        assert row is not None and row.last_event == 5

    def test_prune_deletes_old_finished_jobs_and_their_events(self, store: Store) -> None:
        """Finished jobs past the TTL go with their events; active and recent ones stay."""
        _add(store, "old")
        _add(store, "active")
        lease = store.claim_job("old", "A", 30)
        assert lease is not None
        store.save_job(lease, "done", "{}", [("completed", "{}")])
        assert store.prune_jobs(3600) == 0
        assert store.job("old") is not None
        deadline = time.monotonic() + 5
        while store.prune_jobs(0.05) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert store.job("old") is None
        assert store.job_events("old") == []
        assert store.job("active") is not None

    def test_schedule_claim_is_exclusive(self, store_factory: StoreFactory, key: str) -> None:
        """Of eight racing claims of one period (own connections) exactly one wins; another
        period or schedule is a separate claim."""
        self._reopenable(store_factory)
        stores = [store_factory.open(keyring(key)) for _ in range(8)]
        try:
            barrier, wins = threading.Barrier(8), []

            def claim(n: int) -> None:
                barrier.wait()
                if stores[n].claim_schedule("keepalive", "2024-01-01", f"owner-{n}"):
                    wins.append(n)

            threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(wins) == 1
            assert not stores[0].claim_schedule("keepalive", "2024-01-01", "late")
            assert stores[0].claim_schedule("keepalive", "2024-01-02", "late")
            assert stores[0].claim_schedule("warm", "2024-01-01", "late")
        finally:
            for s in stores:
                s.close()

    def test_reseal_row_rotates_row_by_row_and_resumes(self, store_factory: StoreFactory) -> None:
        """stale_secrets lists rows under an old key; reseal_row does one at a time, and a new
        store (a restart) sees only the rest; afterwards the old key opens nothing."""
        self._reopenable(store_factory)
        old, new = generate_key(), generate_key()
        first = store_factory.open(keyring(old))
        try:
            refresh(first, "c1", "A", "RT-1", "AT-1")
            refresh(first, "c2", "A", "RT-2", "AT-2")
            both = store_factory.open(keyring(new, old))
            items = both.stale_secrets()
            assert "tb_credential/c1" in items and "tb_credential/c2" in items
            assert all("RT-" not in i and "AT-" not in i for i in items)
            assert both.reseal_row("tb_credential/c1") == 2
            assert both.reseal_row("tb_credential/c1") == 0
            both.close()
            again = store_factory.open(keyring(new, old))
            rest = again.stale_secrets()
            assert "tb_credential/c1" not in rest and "tb_credential/c2" in rest
            for item in rest:
                again.reseal_row(item)
            assert again.stale_secrets() == []
            with pytest.raises(ValueError):
                again.reseal_row("tb_consumer/x")
            again.close()
            only_new = store_factory.open(keyring(new))
            row = only_new.load("c2")
            only_new.close()
            assert row is not None and row.refresh_token == Secret("RT-2")
            with pytest.raises(EncryptionKeyError):  # the old key alone opens it no more
                store_factory.open(keyring(old))
        finally:
            first.close()
