"""``tokenbroker keygen`` and ``rotate-key``: the encryption keys of the store's secrets.

``keygen`` prints a new key to put first in ``encryption_keys``; ``rotate-key`` then
re-encrypts every stored secret with it, after which the older keys can go.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..core.crypto import generate_key
from ..errors import TokenBrokerError
from .command import config_option, fail, open_store

__all__ = ["keygen", "rotate_key"]


@click.command("keygen")
def keygen() -> None:
    """Print a new encryption key (32 random bytes, URL-safe base64)."""
    click.echo(generate_key())


@click.command("rotate-key")
@config_option
def rotate_key(config_path: Path) -> None:
    """Re-encrypt every stored secret with the first of encryption_keys."""
    try:
        store = open_store(config_path)
        try:
            count = store.rotate_keys()
        finally:
            store.close()
    except TokenBrokerError as exc:
        fail(exc)
    click.echo(f"re-encrypted {count} secret(s); only the first of encryption_keys is needed now")
