"""Notice, without Redis, that another process re-authorised a credential.

The token cache remembers a reauthorization error until it is reset (one request for N
callers, never a retry storm). The process that takes an ``authorize`` callback resets its
own cache and, in cluster mode, every other process's through the Redis fan-out
(:meth:`~tokenbroker.engine.invalidation.Invalidations.reauthorized`). Without Redis the
other processes on the store would keep answering ``reauthorization_required``; so when a
caller meets the remembered error, :class:`Revival` looks at the credential's row at most
once every ``interval`` seconds per key: a row that is no longer
``reauthorization_required`` and holds an unexpired access token was re-authorised, and
the key is reset (the next fetch serves that token from the store, asking no provider).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from ..store import CredentialStore
from .catalog import CredentialKey, ProviderCatalog
from .credentials import credential_row

__all__ = ["Revival"]


class Revival:
    """Looks at a dead credential's row, rate-limited per key.

    Args:
        store: The credentials.
        catalog: Resolves a caller's key to its row.
        reset: Forgets a key's token and remembered error (the cache's ``reset``).
        interval: The least time between two looks at one key, in seconds.
        clock: Monotonic time for the interval; wall time for the token's expiry.
    """

    def __init__(
        self,
        store: CredentialStore,
        catalog: ProviderCatalog,
        reset: Callable[[Hashable], None],
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._reset = reset
        self._interval = interval
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._looked: dict[Any, float] = {}

    def __repr__(self) -> str:
        return f"Revival(interval={self._interval})"

    def revived(self, raw: Hashable) -> bool:
        """Whether the credential of ``raw`` was re-authorised since its error (then the key
        is reset); False when looked at less than ``interval`` ago, or still dead."""
        now = self._clock()
        with self._lock:
            if now < self._looked.get(raw, -math.inf) + self._interval:
                return False
            self._looked[raw] = now
        try:
            key: CredentialKey = self._catalog.resolve(raw)
            settings = self._catalog.settings.providers[key.provider]
            row = self._store.load(
                credential_row(key.provider, settings, key.scopes, key.account)[0]
            )
        except Exception:  # the store is down or the key no longer resolves: still dead
            return False
        if row is None or row.state == "reauthorization_required" or row.token is None:
            return False
        if row.token.token.expires_at <= self._wall():
            return False
        self._reset(raw)
        return True
