"""In-memory state of the test authorization server: clients, accounts and tokens.

:class:`TokenStore` owns every record and the refresh-token rotation policy, behind one
lock. Records implement the duck-typed model interfaces authlib's grants call
(``ClientMixin`` and ``TokenMixin`` from ``authlib.oauth2.rfc6749.models``).

A refresh-token *family* is everything descended from one seed: the seed, each rotated
successor, and every access token issued by refreshing any of them. Detected reuse revokes
the family as a whole (OAuth 2.0 Security BCP, RFC 9700 §4.14.2).
"""

from __future__ import annotations

import enum
import hmac
import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BearerToken",
    "Client",
    "Family",
    "RefreshOutcome",
    "RefreshToken",
    "Rotation",
    "TokenStore",
]

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

    @property
    def ok(self) -> bool:
        """Tell whether the refresh may proceed.

        Returns:
            True for the two accepted outcomes.
        """
        return self in (RefreshOutcome.ACCEPTED, RefreshOutcome.ACCEPTED_IN_GRACE)


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@dataclass(eq=False)
class Client:
    """A registered OAuth client (RFC 6749 §2), shaped like authlib's ``ClientMixin``.

    Attributes:
        client_id: The client identifier.
        secret: The client secret, or ``None`` for ``private_key_jwt`` and ``none``.
        auth_method: The one token-endpoint auth method it may use (RFC 7591 §2).
        scopes: The scopes it may be granted; also the default when none are requested.
        grant_types: The grant types it may use.
        public_key: The key verifying its ``private_key_jwt`` assertions (a joserfc key).
    """

    client_id: str
    secret: str | None = field(repr=False)
    auth_method: str
    scopes: tuple[str, ...]
    grant_types: frozenset[str]
    public_key: Any = field(default=None, repr=False)

    def get_client_id(self) -> str:
        """Return the client identifier.

        Returns:
            ``client_id``.
        """
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        """Return no redirect URI; this server has no authorization endpoint.

        Returns:
            None.
        """
        return None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        """Reject every redirect URI; this server has no authorization endpoint.

        Args:
            redirect_uri: The URI to check.

        Returns:
            False.
        """
        return False

    def check_response_type(self, response_type: str) -> bool:
        """Reject every response type; this server has no authorization endpoint.

        Args:
            response_type: The response type to check.

        Returns:
            False.
        """
        return False

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """Resolve the scope to grant (RFC 6749 §3.3).

        Args:
            scope: The space-separated requested scope, or ``None``/empty for the default.

        Returns:
            The scope to grant, or ``None`` (authlib answers ``invalid_scope``) when a
            requested scope is not registered for the client.
        """
        if not scope:
            return " ".join(self.scopes)
        requested = scope.split()
        if not set(requested) <= set(self.scopes):
            return None
        return " ".join(requested)

    def check_client_secret(self, client_secret: str) -> bool:
        """Compare a presented secret in constant time.

        Args:
            client_secret: The presented secret.

        Returns:
            True when it equals the registered secret.
        """
        return self.secret is not None and _equal(self.secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        """Tell whether ``method`` is this client's registered auth method.

        Args:
            method: The authentication method that succeeded.
            endpoint: The endpoint name (``"token"``).

        Returns:
            True when the method is the registered one.
        """
        return method == self.auth_method

    def check_grant_type(self, grant_type: str) -> bool:
        """Tell whether the client may use a grant type.

        Args:
            grant_type: The requested ``grant_type``.

        Returns:
            True when it is registered for the client.
        """
        return grant_type in self.grant_types


@dataclass(eq=False)
class Family:
    """A refresh-token family: one seed and everything issued from it.

    Attributes:
        id: A small integer for log messages.
        revoked: Set once reuse was detected; every member is then dead.
    """

    id: int
    revoked: bool = False


@dataclass(eq=False)
class RefreshToken:
    """A refresh token (RFC 6749 §1.5), shaped like authlib's ``TokenMixin``.

    Attributes:
        value: The token string.
        client_id: The client it was issued to.
        scope: The scope it carries.
        family: Its family.
        used_at: Clock time of its first use, ``None`` while unused.
    """

    value: str = field(repr=False)
    client_id: str
    scope: str
    family: Family
    used_at: float | None = None

    def check_client(self, client: Client) -> bool:
        """Tell whether the token was issued to ``client``.

        Args:
            client: The authenticated client.

        Returns:
            True when the client ids match.
        """
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        """Return the scope originally granted.

        Returns:
            The space-separated scope.
        """
        return self.scope

    def is_revoked(self) -> bool:
        """Tell whether its family was revoked.

        Returns:
            True once the family is revoked.
        """
        return self.family.revoked


@dataclass(eq=False)
class BearerToken:
    """An access token or a login token accepted by the protected resource (RFC 6750).

    Attributes:
        value: The token string.
        subject: The client id (access tokens) or username (login tokens).
        scope: The granted scope (empty for login tokens).
        kind: ``"access"`` or ``"login"``.
        expires_at: Clock time it stops working, ``None`` for never.
        family: The refresh family it descends from, if any.
        clock: The store's clock.
        revoked: Set by an explicit revocation.
    """

    value: str = field(repr=False)
    subject: str
    scope: str
    kind: Literal["access", "login"]
    expires_at: float | None
    family: Family | None
    clock: Callable[[], float] = field(repr=False)
    revoked: bool = False

    def get_scope(self) -> str:
        """Return the granted scope.

        Returns:
            The space-separated scope.
        """
        return self.scope

    def is_expired(self) -> bool:
        """Tell whether the token's lifetime is over.

        Returns:
            True at or after ``expires_at``.
        """
        return self.expires_at is not None and self.clock() >= self.expires_at

    def is_revoked(self) -> bool:
        """Tell whether the token or its family was revoked.

        Returns:
            True when revoked directly or through its family.
        """
        return self.revoked or (self.family is not None and self.family.revoked)


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
        return expected is not None and _equal(expected, password)

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
            family = token.family
            if family.revoked:
                return RefreshOutcome.REVOKED
            if self.rotation == "non_rotating":
                return RefreshOutcome.ACCEPTED
            now = self.clock()
            if token.used_at is None:
                token.used_at = now
                return RefreshOutcome.ACCEPTED
            if self.rotation == "grace" and now - token.used_at <= self.reuse_grace_seconds:
                return RefreshOutcome.ACCEPTED_IN_GRACE
            family.revoked = True
        log.warning("refresh token reuse detected; revoked token family %d", family.id)
        return RefreshOutcome.REUSED

    def save_issued(
        self, token: Mapping[str, Any], client_id: str, parent: RefreshToken | None
    ) -> None:
        """Record a token response generated by authlib.

        Args:
            token: The response dict (``access_token``, ``expires_in``, ``scope`` and
                optionally ``refresh_token``).
            client_id: The client it was issued to.
            parent: The refresh token that was spent, ``None`` for other grants.
        """
        scope = str(token.get("scope") or "")
        expires_in = token.get("expires_in")
        with self._lock:
            family = parent.family if parent is not None else None
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
