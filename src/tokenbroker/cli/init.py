"""``tokenbroker init``: a starter configuration, a new encryption key in ``.env`` and a
``.env.example``, in one directory; ``tokenbroker check`` passes on what it writes.

Existing files are never overwritten without ``--force``: ``.env`` may hold the only copy
of the key that decrypts a store.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..core.crypto import generate_key

__all__ = ["STARTER_CONFIG", "init", "write_private"]

#: ``tokenbroker.yaml`` as ``init`` writes it: a SQLite store encrypted with the key in
#: ``.env``, the API on loopback, and an example provider to uncomment
#: (``config.example.yaml`` in the repository lists every field).
STARTER_CONFIG = """\
# tokenbroker configuration (written by `tokenbroker init`).
# Every field, its default and what it does: config.example.yaml in the repository.
# ${VAR} values come from the environment, then from .env beside this file.
store: sqlite:///./tokenbroker.db
encryption_keys: ["${TOKENBROKER_KEY}"]   # first encrypts, all decrypt (`tokenbroker keygen`)

server:
  listen: 127.0.0.1:8750

providers: {}
# providers:
#   example:
#     grant: client_credentials
#     token_url: https://auth.example.com/oauth/token
#     client_id: ${EXAMPLE_CLIENT_ID}
#     client_secret: ${EXAMPLE_CLIENT_SECRET}
#     scopes: [read]

# Consumers are added with `tokenbroker consumers add NAME --allow PROVIDER` (key shown once).
"""

_ENV_EXAMPLE = """\
# Copy to .env beside tokenbroker.yaml and fill in; the process environment wins over it.
# Never commit the filled-in .env: every value here is a secret or names one.

# Store encryption key: 32 random bytes, URL-safe base64 (`tokenbroker keygen`).
TOKENBROKER_KEY=

# providers.example (when uncommented in tokenbroker.yaml)
EXAMPLE_CLIENT_ID=
EXAMPLE_CLIENT_SECRET=
"""


@click.command("init")
@click.argument(
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
)
@click.option("--force", is_flag=True, help="Overwrite tokenbroker.yaml, .env and .env.example.")
def init(directory: Path, force: bool) -> None:
    """Write a starter tokenbroker.yaml, a new encryption key in .env (mode 0600) and a
    .env.example into DIRECTORY (default: here); refuse to overwrite any of them without
    --force. The key is never printed."""
    config, env, example = (directory / n for n in ("tokenbroker.yaml", ".env", ".env.example"))
    existing = [p.name for p in (config, env, example) if p.exists()]
    if existing and not force:
        raise click.ClickException(
            f"{', '.join(existing)} already exist in {directory}: nothing written "
            "(--force overwrites them, and a new key cannot decrypt an existing store)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    config.write_text(STARTER_CONFIG)
    example.write_text(_ENV_EXAMPLE)
    write_private(env, f"TOKENBROKER_KEY={generate_key()}\n")
    click.echo(f"wrote {config}, {env} (mode 0600, a new encryption key) and {example}")
    click.echo(f"next: tokenbroker check --config {config}")


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the first byte (the key
    never sits in a file others may read, not even between a write and a chmod)."""
    if path.exists():
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
