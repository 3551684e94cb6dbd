"""The read-only check behind ``tokenbroker check``: would the PostgreSQL store open?

:func:`probe` connects once (no pool), reads the schema version and the key ids of the
stored secrets, and writes nothing: no table is created, nothing is migrated.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..core.crypto import Keyring
from ..errors import ConfigProblem, StoreCorruptError

__all__ = ["MISSING_EXTRA", "probe"]

#: What to do when psycopg is not installed.
MISSING_EXTRA = (
    "a postgresql:// store needs psycopg and psycopg_pool: pip install 'tokenbroker[postgres]'"
)


def probe(url: str, keyring: Keyring | None) -> list[ConfigProblem]:
    """What would stop the store at ``url`` from opening, found without writing anything.

    Args:
        url: The ``store`` setting.
        keyring: The configured encryption keys, or None when there are none.

    Returns:
        The problems, at ``store`` or ``encryption_keys``; they name key ids, never keys, and
        never the URL's password.
    """
    try:
        import psycopg  # noqa: PLC0415

        from .postgres_connection import parse_url, translate  # noqa: PLC0415
        from .postgres_schema import ALL_SECRETS, MIGRATIONS  # noqa: PLC0415
    except ModuleNotFoundError:
        return [ConfigProblem("store", MISSING_EXTRA)]
    try:
        conninfo, _, where = parse_url(url)
    except ValueError as exc:
        return [ConfigProblem("store", str(exc))]
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.read_only = True
            if conn.execute("SELECT to_regclass('tb_meta')").fetchone() in (None, (None,)):
                return []
            row = conn.execute("SELECT value FROM tb_meta WHERE name = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                message = (
                    f"has schema version {version}; this tokenbroker knows up to {len(MIGRATIONS)}"
                )
                return [ConfigProblem("store", message)]
            if keyring is None or version == 0:
                return []
            blobs = [bytes(b) for (b,) in conn.execute(ALL_SECRETS).fetchall()]
    except psycopg.Error as exc:
        return [ConfigProblem("store", str(translate(exc, where, urlsplit(url).password)))]
    unknown: dict[str, int] = {}
    for blob in blobs:
        try:
            known = keyring.knows(blob)
        except StoreCorruptError as exc:
            return [ConfigProblem("store", str(exc))]
        if not known:
            key_id = Keyring.key_id(blob).hex()
            unknown[key_id] = unknown.get(key_id, 0) + 1
    return [
        ConfigProblem(
            "encryption_keys",
            f"{count} stored secret(s) are encrypted with key {key_id}, which is not among "
            "encryption_keys (add that key back; `tokenbroker rotate-key` then moves them)",
        )
        for key_id, count in sorted(unknown.items())
    ]
