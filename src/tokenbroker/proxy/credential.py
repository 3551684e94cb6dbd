"""One account of a :class:`~tokenbroker.proxy.pool.TokenPool` and its counters.

Credential states: ``AVAILABLE`` (idle, leasable), ``LEASED`` (held by one
lease), ``REFRESHING`` (being logged in by :meth:`TokenPool.warm`), ``FAILED``
(its last login failed permanently; leased again only after a good
:meth:`TokenPool.warm`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ..core.token import Token

__all__ = ["Credential", "CredentialState", "CredentialStats"]


class CredentialState(enum.Enum):
    """Where one account of the pool is."""

    AVAILABLE = "available"
    LEASED = "leased"
    REFRESHING = "refreshing"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class CredentialStats:
    """Counters of one account; never a token.

    Attributes:
        account: The account name.
        state: Its current state.
        uses: Requests begun on it.
        errors: Rejections reported plus failed logins.
        refreshes: Tokens obtained for it (logins).
        idle_seconds: Seconds since a request last began on it (None: never used).
    """

    account: str
    state: CredentialState
    uses: int
    errors: int
    refreshes: int
    idle_seconds: float | None = None


class Credential:
    """One account's state and counters; mutated only under its pool's lock
    (a lease's lock-free request counters aside, see :mod:`~tokenbroker.proxy.lease`)."""

    def __init__(self, account: str, order: int, peek: Callable[[], Token | None]) -> None:
        self.account = account
        self.peek = peek  # the broker's cached token for this account, without fetching
        self.state = CredentialState.AVAILABLE
        self.broken = False
        self.idle_since = order
        self.uses = 0
        self.errors = 0
        self.refreshes = 0
        self.last_used: float | None = None  # the pool clock's monotonic reading

    def __repr__(self) -> str:
        return f"<Credential [{self.state.name}] account={self.account!r}>"
