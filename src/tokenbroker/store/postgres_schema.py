"""The PostgreSQL store's schema: the database clock, the versioned migrations, their lock.

The tables and columns have the names and meanings of the SQLite schema
(:mod:`.sqlite_schema`), so the sealing (:mod:`.sealing`) and the raw test hook are shared;
times are Unix seconds as ``double precision``, ciphertexts ``bytea``. Migration *n* brings
a database from ``tb_meta.schema_version`` *n - 1* to *n*; they are only ever appended, and
run in one transaction under :data:`MIGRATION_LOCK` (PostgreSQL's DDL is transactional).
"""

from __future__ import annotations

from .sealing import SEALED

__all__ = ["ALL_SECRETS", "MIGRATIONS", "MIGRATION_LOCK", "NOW", "OPEN_STATUSES"]

#: The database clock, Unix seconds. ``clock_timestamp()`` rather than ``now()``: a statement
#: that waited on a row lock judges a lease's expiry by the time it runs, not by when its
#: transaction began. Never the replica's clock.
NOW = "(extract(epoch FROM clock_timestamp())::double precision)"

#: The transaction-scoped advisory lock every migration run holds, so replicas starting
#: together migrate once ("tokenbrk" as a 64-bit integer; per database).
MIGRATION_LOCK = 0x746F6B656E62726B

MIGRATIONS = [
    """
    CREATE TABLE tb_credential (
        id TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        fingerprint TEXT NOT NULL DEFAULT '',
        at_ct BYTEA,
        at_version BIGINT NOT NULL DEFAULT 0,
        at_obtained_at DOUBLE PRECISION,
        at_expires_at DOUBLE PRECISION,
        at_lifetime DOUBLE PRECISION,
        rt_ct BYTEA,
        rt_version BIGINT NOT NULL DEFAULT 0,
        seed_digest TEXT,
        state TEXT NOT NULL DEFAULT 'active',
        last_error TEXT,
        last_refresh DOUBLE PRECISION,
        updated_at DOUBLE PRECISION,
        lease_owner TEXT,
        lease_fence BIGINT NOT NULL DEFAULT 0,
        lease_expires_at DOUBLE PRECISION,
        scope TEXT,
        account TEXT
    );
    CREATE TABLE tb_attempt (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        credential_id TEXT NOT NULL REFERENCES tb_credential(id),
        from_version BIGINT NOT NULL,
        to_version BIGINT,
        fence BIGINT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        status TEXT NOT NULL,
        recovery BOOLEAN NOT NULL DEFAULT false,
        raw_ct BYTEA,
        error TEXT
    );
    CREATE INDEX tb_attempt_open ON tb_attempt(credential_id, status);
    CREATE TABLE tb_consumer (
        name TEXT PRIMARY KEY,
        key_sha256 TEXT NOT NULL UNIQUE,
        allow TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE tb_signing_key (
        kid TEXT PRIMARY KEY,
        algorithm TEXT NOT NULL,
        private_ct BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE tb_migration (
        version INTEGER PRIMARY KEY,
        applied_at DOUBLE PRECISION NOT NULL,
        backend_pid INTEGER NOT NULL
    );
    """,
    # Jobs (issue 16), as SQLite's migration 5: the job row is its lease (fence) and record;
    # the partial unique index lets one active job hold an idempotency key, whoever races
    # (an INSERT … ON CONFLICT waits on an uncommitted rival and then sees it); events are
    # numbered per job by the job row's event_seq under its row lock; a schedule period is
    # claimed by inserting its row (the primary key decides).
    """
    CREATE TABLE tb_job (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        document TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        owner TEXT,
        fence BIGINT NOT NULL DEFAULT 0,
        lease_expires_at DOUBLE PRECISION,
        heartbeat_at DOUBLE PRECISION,
        event_seq BIGINT NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX tb_job_active ON tb_job(idem_key)
        WHERE status IN ('queued', 'running', 'canceling');
    CREATE INDEX tb_job_status ON tb_job(status, seq);
    CREATE TABLE tb_job_event (
        job_id TEXT NOT NULL REFERENCES tb_job(id) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE tb_job_schedule (
        name TEXT NOT NULL,
        period TEXT NOT NULL,
        owner TEXT NOT NULL,
        claimed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (name, period)
    );
    """,
]

#: Attempt statuses that may have reached the provider without a stored outcome.
OPEN_STATUSES = ("intent", "in_doubt")

#: Every sealed value in the database, one per row (what the keyring must be able to open).
ALL_SECRETS = " UNION ALL ".join(
    f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL" for table, _, column, _, _ in SEALED
)
