"""One :class:`GrantKind` per provider settings type: its identity, accounts and grant.

The broker never asks a provider's settings what type they are: it looks up the
kind by the ``grant`` discriminator (:func:`kind_of`) and asks the kind. Each kind
classifies every field of its settings model as

* **identity** — copied into the credential fingerprint (``identity_fields``, each
  mapped to its name in the fingerprint), so a token is never served under settings it
  was not issued for (DESIGN §4);
* **keyed** — enters the fingerprint through the cache key instead (the configured
  scopes are the key's scopes unless a consumer asks for others; a login account is
  the key's account); or
* **excluded** — with the reason it does not change whose token this is.

A test walks every settings model's fields and fails on one that is in none of the
three, so a new field cannot silently miss the fingerprint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

from ..config import (
    ClientCredentialsProvider,
    LoginProvider,
    Provider,
    RefreshTokenProvider,
    Rotation,
)
from ..core.secret import Secret
from .base import Grant
from .client_credentials import ClientCredentialsGrant
from .login import LoginGrant
from .refresh_token import RefreshTokenGrant

__all__ = [
    "KINDS",
    "ClientCredentialsKind",
    "GrantKind",
    "LoginKind",
    "RefreshTokenKind",
    "kind_of",
]

S = TypeVar("S")
_O = TypeVar("_O", ClientCredentialsProvider, RefreshTokenProvider)

# The fingerprint always holds these names (None when a grant has no such setting): stored
# rows are keyed by the digest, so its shape is frozen. A name added later enters only when
# its value is not None, which leaves every existing fingerprint unchanged.
_FINGERPRINT_NAMES = ("grant", "url", "client_id", "audience", "scopes", "account")

_TIMING = {
    "skew_seconds": "when to refresh, not what is issued",
    "refresh_ahead": "when to refresh, not what is issued",
    "timeout_seconds": "how long to wait for the provider, not what it issues",
    "deadline_seconds": "how long to wait for the provider, not what it issues",
    "retries": "how often to ask, not what is issued",
    "backoff_seconds": "how long to wait between attempts, not what is issued",
    "invalidate_cooldown_seconds": "how often consumers may force a new token",
    "default_expires_in": "a lifetime used only when a reply has none; a stored token keeps"
    " its own expiry",
    "required": "readiness of the service, not the token",
    "delegation": "delegated tokens are minted per request and never cached or stored",
}
_OAUTH = {
    **_TIMING,
    "client_secret": "a secret (never fingerprinted); a new secret of the same client id"
    " authenticates the same client",
    "client_auth": "how the client authenticates, not which client it is",
    "private_key": "a secret (never fingerprinted); the client is its client_id",
    "signing_alg": "how the client assertion is signed, not which client it is",
    "assertion_audience": "where the client assertion is addressed, not which client it is",
    "max_scopes": "how many scope sets are admitted, not what any token carries",
}


class GrantKind(ABC, Generic[S]):
    """What the broker needs to know about one provider type.

    Attributes:
        grant: The ``grant`` discriminator value of the settings type.
        settings_type: The settings model.
        identity_fields: Settings field → its name in the fingerprint, copied verbatim.
        keyed_fields: Settings field → how it enters the fingerprint through the cache key.
        excluded_fields: Settings field → why it is not part of the identity.
        owns_refresh_token: The credential holds a refresh token that belongs to it, not to
            its settings: its store row is named by the provider alone and survives settings
            changes (DESIGN §4, the exception to the fingerprint rule).
        fixed_scopes: Only the configured scopes can be served (one grant, one scope set).
    """

    grant: ClassVar[str]
    settings_type: ClassVar[type[Any]]
    identity_fields: ClassVar[Mapping[str, str]]
    keyed_fields: ClassVar[Mapping[str, str]]
    excluded_fields: ClassVar[Mapping[str, str]]
    owns_refresh_token: ClassVar[bool] = False
    fixed_scopes: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grant={self.grant!r})"

    def identity(
        self, settings: S, scopes: tuple[str, ...], account: str | None
    ) -> dict[str, object]:
        """The identity-relevant settings of one credential; :func:`fingerprint` digests it.

        Args:
            settings: The provider's settings.
            scopes: The key's canonical scopes.
            account: The key's account (login providers).

        Returns:
            A JSON-able mapping with no secret in it.
        """
        identity: dict[str, object] = dict.fromkeys(_FINGERPRINT_NAMES)
        for field, name in self.identity_fields.items():
            value = getattr(settings, field)
            if value is not None or name in _FINGERPRINT_NAMES:
                identity[name] = value
        identity["scopes"] = list(scopes)
        identity["account"] = account
        return identity

    def accounts(self, settings: S) -> tuple[str, ...]:
        """The account names of a pool (login providers); empty for other grants."""
        return ()

    def scopes(self, settings: S) -> tuple[str, ...]:
        """The configured scopes, as written (empty for grants without scopes)."""
        return ()

    def max_scopes(self, settings: S) -> int | None:
        """The provider's own limit on scope sets (None: the default's)."""
        return None

    def rotation(self, settings: S) -> Rotation | None:
        """How the provider rotates refresh tokens; None without a refresh token."""
        return None

    def seed(self, settings: S) -> Secret | None:
        """The configured refresh token to start from; None without one."""
        return None

    @abstractmethod
    def build(
        self,
        provider: str,
        settings: S,
        scopes: tuple[str, ...],
        account: str | None,
        refresh_token: Secret | None,
    ) -> Grant:
        """The grant for one attempt at a key's token.

        Args:
            provider: The provider's name.
            settings: Its settings.
            scopes: The key's canonical scopes.
            account: The key's account (login providers).
            refresh_token: The stored refresh token, if the store holds one.

        Returns:
            The grant (no I/O done).
        """


class _OAuthKind(GrantKind[_O]):
    """What the two OAuth kinds share: configured scopes and their limit."""

    def scopes(self, settings: _O) -> tuple[str, ...]:
        """The configured scopes, as written."""
        return settings.scopes

    def max_scopes(self, settings: _O) -> int | None:
        """The provider's ``max_scopes``."""
        return settings.max_scopes


class ClientCredentialsKind(_OAuthKind[ClientCredentialsProvider]):
    """OAuth2 client credentials (RFC 6749 §4.4): one token per scope set."""

    grant = "client_credentials"
    settings_type = ClientCredentialsProvider
    identity_fields: ClassVar[Mapping[str, str]] = {
        "grant": "grant",
        "token_url": "url",
        "client_id": "client_id",
        "audience": "audience",
    }
    keyed_fields: ClassVar[Mapping[str, str]] = {
        "scopes": "the configured scopes are the key's scopes unless a consumer asks for others",
    }
    excluded_fields: ClassVar[Mapping[str, str]] = _OAUTH

    def build(
        self,
        provider: str,
        settings: ClientCredentialsProvider,
        scopes: tuple[str, ...],
        account: str | None,
        refresh_token: Secret | None,
    ) -> Grant:
        """A client credentials grant for the key's scopes."""
        return ClientCredentialsGrant(provider, settings, scopes)


class RefreshTokenKind(_OAuthKind[RefreshTokenProvider]):
    """A refresh-token credential (RFC 6749 §6): the store owns its rotating refresh token."""

    grant = "refresh_token"
    settings_type = RefreshTokenProvider
    identity_fields = ClientCredentialsKind.identity_fields
    keyed_fields = ClientCredentialsKind.keyed_fields
    excluded_fields: ClassVar[Mapping[str, str]] = {
        **_OAUTH,
        "refresh_token": "the seed only: the refresh token belongs to the credential and"
        " survives settings changes (DESIGN §4); a secret, never fingerprinted",
        "rotation": "how the provider rotates refresh tokens, not what it issues",
        "reauthorization_errors": "how failures are classified, not what is issued",
        "authorization": "how a person obtains a new refresh token, not what a refresh"
        " issues; the credential survives it (DESIGN §4)",
    }
    owns_refresh_token = True
    fixed_scopes = True

    def rotation(self, settings: RefreshTokenProvider) -> Rotation:
        """The provider's ``rotation``."""
        return settings.rotation

    def seed(self, settings: RefreshTokenProvider) -> Secret:
        """The configured ``refresh_token``."""
        return settings.refresh_token

    def build(
        self,
        provider: str,
        settings: RefreshTokenProvider,
        scopes: tuple[str, ...],
        account: str | None,
        refresh_token: Secret | None,
    ) -> Grant:
        """A refresh grant with the stored refresh token, else the configured seed."""
        return RefreshTokenGrant(provider, settings, refresh_token or settings.refresh_token)


class LoginKind(GrantKind[LoginProvider]):
    """Username/password login: a pool with one token per account."""

    grant = "login"
    settings_type = LoginProvider
    identity_fields: ClassVar[Mapping[str, str]] = {"grant": "grant", "login_url": "url"}
    keyed_fields: ClassVar[Mapping[str, str]] = {
        "credentials": "each account's username is its key's account; passwords never enter",
    }
    excluded_fields: ClassVar[Mapping[str, str]] = {
        **_TIMING,
        "request": "the body template of the login, sent to the same endpoint for the same account",
        "token_path": "where the reply holds the token, not whose token it is",
        "expires_in_path": "where the reply holds the lifetime, not whose token it is",
        "token_type": "how the token is presented, not whose it is",
        "ttl_seconds": "a lifetime used only when a reply has none; a stored token keeps its"
        " own expiry",
    }

    def accounts(self, settings: LoginProvider) -> tuple[str, ...]:
        """The account names of ``credentials`` in configured order: each username, followed
        by ``username#2`` … for a credential with ``sessions`` above 1."""
        return tuple(name for c in settings.credentials for name in c.accounts())

    def build(
        self,
        provider: str,
        settings: LoginProvider,
        scopes: tuple[str, ...],
        account: str | None,
        refresh_token: Secret | None,
    ) -> Grant:
        """A login grant for the key's account."""
        credential = next(c for c in settings.credentials if account in c.accounts())
        return LoginGrant(provider, settings, credential)


#: The kind of each ``grant`` discriminator value.
KINDS: Mapping[str, GrantKind[Any]] = {
    kind.grant: kind for kind in (ClientCredentialsKind(), RefreshTokenKind(), LoginKind())
}


def kind_of(settings: Provider) -> GrantKind[Any]:
    """The kind of a provider's settings, by its ``grant`` discriminator.

    Args:
        settings: Validated provider settings.

    Returns:
        Its :class:`GrantKind`.
    """
    return KINDS[settings.grant]
