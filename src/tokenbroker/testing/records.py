"""In-memory state of the test authorization server: clients, accounts and tokens.

:class:`TokenStore` owns every record (:mod:`~tokenbroker.testing.models`) and the
refresh-token rotation policy, behind one lock. Detected reuse of a refresh token revokes
its whole family (OAuth 2.0 Security BCP, RFC 9700 §4.14.2).
"""

from __future__ import annotations

import enum
import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from .models import BearerToken, Client, Family, RefreshToken, equal_secrets

__all__ = ["RefreshOutcome", "Rotation", "TokenStore"]

log = logging.getLogger("tokenbroker.testing")

#: Refresh-token rotation policies, see :class:`TokenStore`.
Rotation = Literal["strict", "grace", "non_rotating"]
ROTATIONS: frozenset[str] = frozenset({"strict", "grace", "non_rotating"})


class RefreshOutcome(enum.Enum):
    """What presenting a refresh token did."""

    ACCEPTED = "accepted"
    ACCEPTED_IN_GRACE = "accepted_in_grace"
    REUSED = "reused"
    REVOKED = "revoked"
    UNKNOWN = "unknown"

    @property
    def ok(self) -> bool:
        """Tell whether the refresh may proceed.

        Returns:
            True for the two accepted outcomes.
        """
        return self in (RefreshOutcome.ACCEPTED, RefreshOutcome.ACCEPTED_IN_GRACE)


class TokenStore:
    """Thread-safe registry of clients, accounts and tokens, and the rotation policy.

    Rotation policies for refresh tokens (RFC 6749 §6, §10.4):

    * ``"strict"``: single use; a second use revokes the whole family.
    * ``"grace"``: single use, but a repeat within ``reuse_grace_seconds`` of the first
      use is accepted again; later repeats revoke the family.
    * ``"non_rotating"``: reusable; no successor is issued.
    """

    def __init__(
        self,
        *,
        rotation: Rotation,
        reuse_grace_seconds: float,
        login_ttl_seconds: float | None,
        clock: Callable[[], float],
    ) -> None:
        """Create an empty store.

        Args:
            rotation: The refresh-token rotation policy.
            reuse_grace_seconds: The grace window of the ``"grace"`` policy.
            login_ttl_seconds: Lifetime of login tokens; ``None`` for unlimited.
            clock: Returns the current time in seconds.

        Raises:
            ValueError: Unknown rotation or a negative grace window.
        """
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {sorted(ROTATIONS)}")
        if reuse_grace_seconds < 0:
            raise ValueError("reuse_grace_seconds must be >= 0")
        self.rotation: Rotation = rotation
        self.reuse_grace_seconds = reuse_grace_seconds
        self.login_ttl_seconds = login_ttl_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._family_ids = itertools.count(1)
        self._clients: dict[str, Client] = {}
        self._accounts: dict[str, str] = {}
        self._refresh: dict[str, RefreshToken] = {}
        self._bearer: dict[str, BearerToken] = {}
        self._issued_access: list[str] = []
        self._issued_login: list[str] = []
        self._jtis: set[tuple[str, str]] = set()
        self._outcomes: list[tuple[str, RefreshOutcome]] = []

    @property
    def rotates(self) -> bool:
        """Tell whether a refresh issues a successor refresh token.

        Returns:
            False for the ``"non_rotating"`` policy.
        """
        return self.rotation != "non_rotating"

    def add_client(self, client: Client) -> None:
        """Register or replace a client.

        Args:
            client: The client record.
        """
        with self._lock:
            self._clients[client.client_id] = client

    def get_client(self, client_id: str) -> Client | None:
        """Look a client up.

        Args:
            client_id: The client identifier.

        Returns:
            The client, or ``None`` when unknown.
        """
        with self._lock:
            return self._clients.get(client_id)

    def add_account(self, username: str, password: str) -> None:
        """Register or replace a login account.

        Args:
            username: The user name.
            password: The password.
        """
        with self._lock:
            self._accounts[username] = password

    def check_account(self, username: str, password: str) -> bool:
        """Verify login credentials in constant time.

        Args:
            username: The presented user name.
            password: The presented password.

        Returns:
            True when the account exists and the password matches.
        """
        with self._lock:
            expected = self._accounts.get(username)
        return expected is not None and equal_secrets(expected, password)

    def seed_refresh(self, client_id: str, scope: str | None) -> str:
        """Start a refresh-token family, as if an earlier grant had issued it.

        Args:
            client_id: A registered client.
            scope: Space-separated scope; ``None`` for the client's default scope.

        Returns:
            The new refresh token.

        Raises:
            KeyError: The client is unknown.
            ValueError: The scope is not registered for the client.
        """
        client = self.get_client(client_id)
        if client is None:
            raise KeyError(client_id)
        allowed = client.get_allowed_scope(scope)
        if allowed is None:
            raise ValueError(f"scope {scope!r} is not registered for client {client_id!r}")
        with self._lock:
            return self._new_refresh(client_id, allowed, Family(next(self._family_ids)))

    def new_family(self) -> Family:
        """Start an empty token family, e.g. for what one authorization code will issue.

        Returns:
            The family.
        """
        with self._lock:
            return Family(next(self._family_ids))

    def revoke_family(self, family: Family) -> None:
        """Revoke every refresh and access token of a family, issued or still to come.

        Args:
            family: The family.
        """
        with self._lock:
            family.revoked = True
        log.info("revoked token family %d", family.id)

    def _new_refresh(self, client_id: str, scope: str, family: Family) -> str:
        value = secrets.token_urlsafe(32)
        self._refresh[value] = RefreshToken(value, client_id, scope, family)
        return value

    def find_refresh(self, value: str) -> RefreshToken | None:
        """Look a refresh token up, whatever its state.

        Args:
            value: The presented token.

        Returns:
            The record, or ``None`` when never issued.
        """
        with self._lock:
            return self._refresh.get(value)

    def consume_refresh(self, token: RefreshToken) -> RefreshOutcome:
        """Atomically spend a refresh token under the rotation policy.

        Args:
            token: A record returned by :meth:`find_refresh`.

        Returns:
            The outcome; ``REUSED`` means the family has just been revoked.
        """
        with self._lock:
            outcome = self._consume(token)
            self._outcomes.append((token.value, outcome))
        if outcome is RefreshOutcome.REUSED:
            log.info("refresh token reuse detected; revoked token family %d", token.family.id)
        return outcome

    def _consume(self, token: RefreshToken) -> RefreshOutcome:
        family = token.family
        if family.revoked:
            return RefreshOutcome.REVOKED
        if self.rotation == "non_rotating":
            return RefreshOutcome.ACCEPTED
        now = self.clock()
        if token.used_at is None:
            token.used_at = now
            return RefreshOutcome.ACCEPTED
        if self.rotation == "grace" and now - token.used_at < self.reuse_grace_seconds:
            return RefreshOutcome.ACCEPTED_IN_GRACE
        family.revoked = True
        return RefreshOutcome.REUSED

    def reject_unknown(self, value: str) -> RefreshOutcome:
        """Record that a refresh token never issued here was presented.

        Args:
            value: The presented token.

        Returns:
            ``UNKNOWN``.
        """
        with self._lock:
            self._outcomes.append((value, RefreshOutcome.UNKNOWN))
        return RefreshOutcome.UNKNOWN

    def refresh_outcomes(self) -> list[tuple[str, RefreshOutcome]]:
        """What each processed refresh-token presentation did, in order.

        Returns:
            A copy of the ``(token, outcome)`` list.
        """
        with self._lock:
            return list(self._outcomes)

    def forget_outcomes(self) -> None:
        """Clear :meth:`refresh_outcomes`."""
        with self._lock:
            self._outcomes.clear()

    def save_issued(
        self,
        token: Mapping[str, Any],
        client_id: str,
        parent: RefreshToken | None,
        family: Family | None = None,
    ) -> None:
        """Record a token response generated by authlib.

        Args:
            token: The response dict (``access_token``, ``expires_in``, ``scope`` and
                optionally ``refresh_token``).
            client_id: The client it was issued to.
            parent: The refresh token that was spent, ``None`` for other grants.
            family: The family of an authorization code's tokens (:meth:`new_family`).
        """
        scope = str(token.get("scope") or "")
        expires_in = token.get("expires_in")
        with self._lock:
            if parent is not None:
                family = parent.family
            if "refresh_token" in token:
                if family is None:
                    family = Family(next(self._family_ids))
                self._refresh[token["refresh_token"]] = RefreshToken(
                    token["refresh_token"], client_id, scope, family
                )
            value = str(token["access_token"])
            expires_at = self.clock() + float(expires_in) if expires_in else None
            self._bearer[value] = BearerToken(
                value, client_id, scope, "access", expires_at, family, self.clock
            )
            self._issued_access.append(value)

    def issue_login(self, username: str) -> str:
        """Issue a login token for an authenticated account.

        Args:
            username: The account name.

        Returns:
            The new token.
        """
        value = secrets.token_urlsafe(32)
        ttl = self.login_ttl_seconds
        with self._lock:
            expires_at = self.clock() + ttl if ttl is not None else None
            self._bearer[value] = BearerToken(
                value, username, "", "login", expires_at, None, self.clock
            )
            self._issued_login.append(value)
        return value

    def find_bearer(self, value: str) -> BearerToken | None:
        """Look an access or login token up, whatever its state.

        Args:
            value: The presented token.

        Returns:
            The record, or ``None`` when never issued.
        """
        with self._lock:
            return self._bearer.get(value)

    def revoke_bearer(self, value: str) -> bool:
        """Revoke one access or login token.

        Args:
            value: The token.

        Returns:
            True when the token was known.
        """
        with self._lock:
            record = self._bearer.get(value)
            if record is None:
                return False
            record.revoked = True
            return True

    def expire_bearer(self, kinds: Iterable[str]) -> int:
        """Make every access/login token of the given kinds expire now.

        Args:
            kinds: Any of ``"access"`` and ``"login"``.

        Returns:
            The number of tokens expired.
        """
        wanted = set(kinds)
        with self._lock:
            now = self.clock()
            records = [r for r in self._bearer.values() if r.kind in wanted]
            for record in records:
                record.expires_at = now
            return len(records)

    def issued(self, kind: Literal["access", "login"]) -> list[str]:
        """List the tokens issued so far, oldest first.

        Args:
            kind: ``"access"`` (token endpoint) or ``"login"`` (login endpoint).

        Returns:
            A copy of the list.
        """
        with self._lock:
            return list(self._issued_access if kind == "access" else self._issued_login)

    def remember_jti(self, client_id: str, jti: str) -> bool:
        """Record a client assertion's ``jti`` (RFC 7523 §3, item 7).

        Args:
            client_id: The asserting client.
            jti: The JWT ID.

        Returns:
            True the first time the pair is seen, False on a replay.
        """
        key = (client_id, jti)
        with self._lock:
            if key in self._jtis:
                return False
            self._jtis.add(key)
            return True
