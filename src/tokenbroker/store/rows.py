"""The store's rows, as the rest of tokenbroker sees them (decrypted, redacted in reprs)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.secret import Secret
from ..core.token import Token

__all__ = ["Attempt", "CredentialRow", "Lease", "StoredToken"]


@dataclass(frozen=True, slots=True, repr=False)
class StoredToken:
    """A stored access token.

    Attributes:
        token: The token as consumers get it.
        lifetime: Its full lifetime in seconds.
        obtained_at: Wall-clock time it was requested.
        fingerprint: Fingerprint of the settings it was issued under.
    """

    token: Token
    lifetime: float
    obtained_at: float
    fingerprint: str

    def __repr__(self) -> str:
        return f"StoredToken(expires_at={self.token.expires_at:.0f}, lifetime={self.lifetime})"


@dataclass(frozen=True, slots=True, repr=False)
class CredentialRow:
    """One credential row, decrypted.

    Attributes:
        id: Row id (see the broker's key scheme).
        provider: Provider name.
        token: The stored access token, if any.
        refresh_token: The stored refresh token, if any.
        rt_version: Increments with every applied refresh.
        seed_digest: SHA-256 of the configured seed the refresh token chain started from.
        state: ``active``, ``refreshing``, ``in_doubt`` or ``reauthorization_required``.
        last_error: Class name of the last failure.
        last_refresh: Wall-clock time of the last applied token.
        lease_owner: Who holds the lease, if anyone.
        lease_fence: The fence counter.
        lease_expires_at: Database-clock expiry of the lease.
    """

    id: str
    provider: str
    token: StoredToken | None
    refresh_token: Secret | None
    rt_version: int
    seed_digest: str | None
    state: str
    last_error: str | None
    last_refresh: float | None
    lease_owner: str | None
    lease_fence: int
    lease_expires_at: float | None

    def __repr__(self) -> str:
        return f"CredentialRow(id={self.id!r}, state={self.state!r}, rt_version={self.rt_version})"


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lease: proof of the right to refresh one credential.

    Attributes:
        id: The credential row.
        owner: Our owner id.
        fence: The fence value our writes must carry.
        rt_version: The refresh-token version when the lease was taken.
        expires_at: Database-clock expiry.
    """

    id: str
    owner: str
    fence: int
    rt_version: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Attempt:
    """A recorded refresh attempt.

    Attributes:
        id: Attempt id.
        from_version: The refresh-token version it presented.
        fence: The fence it ran under.
        started_at: Database-clock start.
        status: ``intent``, ``in_doubt``, ``succeeded``, ``orphaned``, ``failed``, ``superseded``.
        recovery: Whether it was a recovery of an earlier in-doubt attempt.
    """

    id: int
    from_version: int
    fence: int
    started_at: float
    status: str
    recovery: bool
