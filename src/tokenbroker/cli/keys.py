"""``tokenbroker keygen``: a new encryption key for the store's secrets.

``keygen`` prints a new key to put first in ``encryption_keys``; ``rotate-key``
(:mod:`tokenbroker.cli.jobs`, a ``rotate_key`` job) then re-encrypts every stored secret
with it, after which the older keys can go.
"""

from __future__ import annotations

import click

from ..core.crypto import generate_key

__all__ = ["keygen"]


@click.command("keygen")
def keygen() -> None:
    """Print a new encryption key (32 random bytes, URL-safe base64)."""
    click.echo(generate_key())
