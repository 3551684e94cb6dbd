"""Compare-and-invalidate for the token cache, with its cooldown and cluster fan-out.

:meth:`Invalidations.invalidate` drops a token only if it is still the current one, so many
consumers reporting the same rejected token cause one fetch; after it has dropped one it
drops none for that key during the key's ``invalidate_cooldown``. With ``shared`` limits
(cluster mode) that cooldown is one per key across every process, and a dropped token is
announced by a digest (never the token) so other processes drop it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from ..core.events import EventBus, TokenInvalidated
from ..errors import CoordinationUnavailableError
from .coordination import SharedLimits
from .fetcher import Fetcher
from .slot import Entry, Slot

__all__ = ["REAUTHORIZED", "Invalidations"]

#: The digest a "token dropped" notice carries when the credential was re-authorised: every
#: process forgets the key's token *and* its remembered reauthorization error.
REAUTHORIZED = "reauthorized"

logger = logging.getLogger("tokenbroker.cache")

K = TypeVar("K", bound=Hashable)


def _digest(access_token: str) -> str:
    """What a "token dropped" notice names instead of the token (never the token itself)."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:32]


class Invalidations(Generic[K]):
    """The invalidation half of :class:`~tokenbroker.engine.cache.TokenCache` (a mixin: it
    works on the cache's slots, under each slot's lock)."""

    _fetcher: Fetcher[K]
    _now: Callable[[], float]
    _events: EventBus
    _slots: dict[K, Slot[K]]
    _shared: SharedLimits | None

    def _slot(self, raw: Hashable) -> Slot[K]:
        raise NotImplementedError

    def _install(self, slot: Slot[K], entry: Entry | None) -> None:
        raise NotImplementedError

    def invalidate(self, raw: Hashable, access_token: str) -> bool:
        """Drop the current token, but only if it is ``access_token`` (compare-and-invalidate)
        and the key's ``invalidate_cooldown`` has passed since it last dropped one.

        Args:
            raw: The caller's key.
            access_token: The token the caller found rejected.

        Returns:
            True if it was the current token and was dropped; False if it was not current,
            or if it was kept because of the cooldown.
        """
        slot = self._slot(raw)
        cooldown = self._fetcher.timing(slot.key).invalidate_cooldown
        with slot.lock:
            entry = slot.entry
            if entry is None or not hmac.compare_digest(
                entry.token.access_token.encode(), access_token.encode()
            ):
                return False
            held = self._now() < slot.forced_at + cooldown
        provider, key = self._fetcher.describe(slot.key)
        name = self._name(slot.key)
        if not held and self._shared is not None and cooldown > 0:
            # Outside the slot lock: a network round trip must not hold up readers.
            # Redis away: this process's cooldown alone applies.
            with contextlib.suppress(CoordinationUnavailableError):
                held = not self._shared.claim(f"cooldown:{name}", cooldown)
        if held:
            logger.debug(
                "token invalidation within the cooldown ignored provider=%s %s", provider, key
            )
            return False
        with slot.lock:
            if slot.entry is not entry:  # replaced or dropped meanwhile
                return False
            self._install(slot, None)
            slot.rejected = access_token
            slot.forced_at = self._now()
        if self._shared is not None:
            self._shared.dropped(name, _digest(access_token))
        logger.info("token invalidated provider=%s %s", provider, key)
        self._events.emit(TokenInvalidated(provider, key))
        return True

    def reauthorized(self, raw: Hashable) -> None:
        """The credential of ``raw`` has a new refresh token (an ``authorize`` job stored
        it): forget the key's token and remembered error here, and (cluster mode) tell every
        other process to do the same, so the next caller reads the store.

        Args:
            raw: The caller's key.
        """
        slot = self._slot(raw)
        with slot.lock:
            self._install(slot, None)
            slot.clear_error()
            slot.rejected = None
        if self._shared is not None:
            self._shared.dropped(self._name(slot.key), REAUTHORIZED)

    def _name(self, key: K) -> str:
        """The key's name in shared limits and notices: the same in every process, no secret."""
        provider, words = self._fetcher.describe(key)
        return hashlib.sha256(f"{provider}\n{words}".encode()).hexdigest()[:24]

    def _dropped_elsewhere(self, name: str, digest: str) -> None:
        """Another process dropped the token ``digest`` of ``name``: drop it here too if it is
        still the current one (a later token, or none, stays as it is)."""
        for slot in list(self._slots.values()):
            if self._name(slot.key) != name:
                continue
            if digest == REAUTHORIZED:
                with slot.lock:
                    self._install(slot, None)
                    slot.clear_error()
                    slot.rejected = None
                logger.info("credential re-authorised in another process %s", name)
                continue
            with slot.lock:
                entry = slot.entry
                if entry is None or not hmac.compare_digest(
                    _digest(entry.token.access_token), digest
                ):
                    continue
                self._install(slot, None)
                slot.rejected = entry.token.access_token
                slot.forced_at = self._now()
            provider, key = self._fetcher.describe(slot.key)
            logger.info(
                "token dropped after another process invalidated it provider=%s %s", provider, key
            )
