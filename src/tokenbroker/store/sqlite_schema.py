"""The store's schema: the database clock expression and the versioned migrations.

Migration *n* brings a database from ``PRAGMA user_version`` *n - 1* to *n*; they are
only ever appended. The SQL is kept portable; the database clock is one expression.
"""

from __future__ import annotations

from .sealing import SEALED

__all__ = ["ALL_SECRETS", "MIGRATIONS", "NOW", "OPEN_STATUSES"]

NOW = "((julianday('now') - 2440587.5) * 86400.0)"

MIGRATIONS = [
    """
    CREATE TABLE tb_credential (
        id TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        fingerprint TEXT NOT NULL DEFAULT '',
        at_ct BLOB,
        at_version INTEGER NOT NULL DEFAULT 0,
        at_obtained_at REAL,
        at_expires_at REAL,
        at_lifetime REAL,
        rt_ct BLOB,
        rt_version INTEGER NOT NULL DEFAULT 0,
        seed_digest TEXT,
        state TEXT NOT NULL DEFAULT 'active',
        last_error TEXT,
        last_refresh REAL,
        updated_at REAL,
        lease_owner TEXT,
        lease_fence INTEGER NOT NULL DEFAULT 0,
        lease_expires_at REAL
    );
    CREATE TABLE tb_attempt (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        credential_id TEXT NOT NULL REFERENCES tb_credential(id),
        from_version INTEGER NOT NULL,
        to_version INTEGER,
        fence INTEGER NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        status TEXT NOT NULL,
        recovery INTEGER NOT NULL DEFAULT 0,
        raw_ct BLOB,
        error TEXT
    );
    CREATE INDEX tb_attempt_open ON tb_attempt(credential_id, status);
    """,
    """
    CREATE TABLE tb_consumer (
        name TEXT PRIMARY KEY,
        key_sha256 TEXT NOT NULL UNIQUE,
        allow TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE tb_signing_key (
        kid TEXT PRIMARY KEY,
        algorithm TEXT NOT NULL,
        private_ct BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # What a credential row is for, in words (no secret: the canonical scope and the account
    # name), so `tokenbroker status` need not show the row id's settings digest.
    """
    ALTER TABLE tb_credential ADD COLUMN scope TEXT;
    ALTER TABLE tb_credential ADD COLUMN account TEXT;
    """,
    # Jobs (issue 16): the job row is its lease (fence) and record; events are numbered per
    # job; a schedule period is claimed by inserting its row (the primary key decides).
    """
    CREATE TABLE tb_job (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        document TEXT NOT NULL,
        created_at REAL NOT NULL,
        finished_at REAL,
        owner TEXT,
        fence INTEGER NOT NULL DEFAULT 0,
        lease_expires_at REAL,
        heartbeat_at REAL,
        event_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX tb_job_active ON tb_job(idem_key)
        WHERE status IN ('queued', 'running', 'canceling');
    CREATE INDEX tb_job_status ON tb_job(status, seq);
    CREATE TABLE tb_job_event (
        job_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE tb_job_schedule (
        name TEXT NOT NULL,
        period TEXT NOT NULL,
        owner TEXT NOT NULL,
        claimed_at REAL NOT NULL,
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
