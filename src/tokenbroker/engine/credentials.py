"""Where credentials live: the store the settings name, and each credential's row in it.

:func:`store_for` opens the configured store with the configured encryption keys (the
start-up step every broker and the CLI take). :func:`credential_row` names the row a
credential's tokens are kept in; :func:`credential_label` reads a row back in words for
``tokenbroker status``, never showing a digest.
"""

from __future__ import annotations

from ..config import MISSING_KEY, Provider, Settings
from ..core.crypto import Keyring, generate_key
from ..core.scopes import canonical_scopes
from ..core.secret import Secret
from ..errors import EncryptionKeyError
from ..grants import kind_of
from ..store import Store, is_persistent
from ..store import open_store as _open_url
from .refresher import fingerprint

__all__ = ["STALE_KEY", "credential_label", "credential_row", "store_for"]


def store_for(settings: Settings) -> Store:
    """Open the store the settings name, with their encryption keys.

    A store that does not outlive the process (``store: memory``) without keys gets a
    random key that lives as long as the process.

    Args:
        settings: Validated settings.

    Returns:
        The opened (and migrated) store.

    Raises:
        EncryptionKeyError: Bad keys, or stored secrets need a key that is not configured.
        StoreError: The store cannot be opened.
    """
    keys = settings.encryption_keys
    if not keys and not is_persistent(settings.store):
        keys = (Secret(generate_key()),)
    elif not keys:
        raise EncryptionKeyError(MISSING_KEY)
    return _open_url(
        settings.store, Keyring(keys), busy_timeout=settings.defaults.store_busy_timeout_seconds
    )


def credential_row(
    name: str, settings: Provider, scopes: tuple[str, ...], account: str | None
) -> tuple[str, str]:
    """The store row of one credential, and the digest of the settings its tokens belong to.

    A refresh token belongs to the credential, so a refresh-token provider's row is its name
    and survives settings changes; other rows are named by the digest, so a token issued
    under other settings is never used.

    Args:
        name: The provider's name.
        settings: Its settings.
        scopes: The canonical scopes.
        account: The account of a login provider.

    Returns:
        ``(row id, settings digest)``.
    """
    kind = kind_of(settings)
    digest = fingerprint(kind.identity(settings, scopes, account))
    if kind.owns_refresh_token:
        return name, digest
    return f"{name}:{digest}", digest


#: What ``status`` shows for a row that no configured key maps to (the settings changed).
STALE_KEY = "(stale key)"


def credential_label(
    settings: Settings, row_id: str, provider: str, scope: str | None, account: str | None
) -> tuple[str, str]:
    """``(scope, account)`` in words for a stored credential row, checked against ``settings``.

    The scope reads ``(configured)`` for the provider's configured scopes, ``-`` for a login
    provider; the account ``-`` when there is none. A row written before rows carried their
    scope and account is matched against the configured keys. A row that no key of the
    current settings would use reads :data:`STALE_KEY`.

    Args:
        settings: The current settings.
        row_id: The row's id.
        provider: The row's provider.
        scope: The canonical scope stored with the row, if any.
        account: The account stored with the row, if any.

    Returns:
        ``(scope words, account words)``; never a digest.
    """
    spec = settings.providers.get(provider)
    if spec is None:
        return STALE_KEY, account or "-"
    kind = kind_of(spec)
    accounts = kind.accounts(spec)
    names: list[str | None] = [*accounts] or [None]
    configured = () if accounts else canonical_scopes(None, kind.scopes(spec))
    if scope is None:  # an older row: try the configured keys
        found = [n for n in names if credential_row(provider, spec, configured, n)[0] == row_id]
        if not found:
            return STALE_KEY, "-"
        scope, account = " ".join(configured), found[0]
    scopes = tuple(scope.split())
    if account not in names or credential_row(provider, spec, scopes, account)[0] != row_id:
        return STALE_KEY, account or "-"
    if accounts:
        return "-", account or "-"
    return "(configured)" if scopes == configured else scope, "-"
