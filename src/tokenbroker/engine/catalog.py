"""The configured providers as the engine reads them: keys, timing, retry policy, grants.

A caller asks for ``(provider, scope, account)``; :meth:`ProviderCatalog.resolve` turns
that into the one :class:`CredentialKey` the cache keys on, the store row is named by
and the grant sends (DESIGN §3.2), refusing unknown names, scopes a provider cannot
serve, and new scope sets beyond ``max_scopes`` (counted across processes when given
:class:`~tokenbroker.engine.coordination.SharedLimits`, else in this process). The rest
answers, per provider, what the broker needs to fetch: the refresh
:class:`~tokenbroker.engine.slot.Timing`, the :class:`~tokenbroker.grants.RetryPolicy`,
the grant, and the refresher's :class:`~tokenbroker.engine.refresher.RefreshJob`. A
provider's own value wins over ``defaults``. Nothing here does I/O.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Hashable
from typing import NamedTuple, TypeVar

from ..config import Provider, Settings
from ..core.scopes import canonical_scopes, parse_scope, scope_string
from ..core.secret import Secret
from ..errors import CoordinationUnavailableError, TooManyScopesError, UnknownProviderError
from ..grants import Exchange, Grant, RetryPolicy, kind_of
from .coordination import SharedLimits
from .credentials import credential_row
from .refresher import RefreshJob
from .slot import Timing

__all__ = ["CredentialKey", "ProviderCatalog", "scope_alias"]

_T = TypeVar("_T", int, float)


class CredentialKey(NamedTuple):
    """What one cached token (and its store row) is for.

    Attributes:
        provider: The provider's name.
        scopes: The canonical scopes; empty for a login provider's account.
        account: The account of a login provider, else None.
    """

    provider: str
    scopes: tuple[str, ...]
    account: str | None


class ProviderCatalog:
    """Resolves callers' keys against the settings and derives each provider's fetch rules.

    Args:
        settings: Validated settings.
        shared: Counts ``max_scopes`` across processes (cluster mode); None: this process.
    """

    def __init__(self, settings: Settings, *, shared: SharedLimits | None = None) -> None:
        self.settings = settings
        self._shared = shared
        # Scope sets admitted per provider (bounded by max_scopes), and the lock guarding them.
        self._scope_sets: dict[str, set[tuple[str, ...]]] = {}
        self._scope_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProviderCatalog(providers={sorted(self.settings.providers)})"

    def provider(self, name: str) -> Provider:
        """The settings of provider ``name``.

        Raises:
            UnknownProviderError: No such provider.
        """
        try:
            return self.settings.providers[name]
        except (KeyError, TypeError):
            raise UnknownProviderError(f"unknown provider {name!r}") from None

    def accounts(self, name: str) -> list[str]:
        """The account names of a login provider (empty for other grants).

        Raises:
            UnknownProviderError: No such provider.
        """
        settings = self.provider(name)
        return list(kind_of(settings).accounts(settings))

    def required(self) -> list[str]:
        """The names of the ``required: true`` providers, sorted."""
        return sorted(name for name, p in self.settings.providers.items() if p.required)

    def resolve(self, raw: Hashable) -> CredentialKey:
        """The canonical key for ``(provider, scope, account)``.

        A login provider (a pool) is keyed by account, its first by default, never by
        scope; any other provider by its canonical scopes (blank: the configured ones).

        Raises:
            UnknownProviderError: Unknown provider or account, an account for a provider
                without accounts, or a scope a fixed-scope provider cannot serve.
            InvalidScopeError: A malformed scope.
            TooManyScopesError: A new scope set beyond the provider's ``max_scopes``.
        """
        provider: str
        scope: object
        account: str | None
        provider, scope, account = raw  # type: ignore[misc]
        settings = self.provider(provider)
        kind = kind_of(settings)
        names = kind.accounts(settings)
        if names:  # a pool: keyed by account, never by scope
            parse_scope(scope)  # malformed is refused; a login has no scopes
            if account is None:
                account = names[0]
            elif account not in names:
                raise UnknownProviderError(f"provider {provider!r} has no account {account!r}")
            return CredentialKey(provider, (), account)
        # The one canonical value: the ACL checked it, the cache keys on it, the grant sends it.
        scopes = canonical_scopes(scope, kind.scopes(settings))
        if account is not None:
            raise UnknownProviderError(f"provider {provider!r} has no accounts")
        configured = canonical_scopes(None, kind.scopes(settings))
        if kind.fixed_scopes and scopes != configured:
            # One refresh token, one grant: its refresh request always asks for the configured
            # scopes, so a token for any other set would carry more (or less) than asked for.
            raise UnknownProviderError(f"provider {provider!r} cannot serve that scope")
        self._admit(provider, scopes, configured, kind.max_scopes(settings))
        return CredentialKey(provider, scopes, None)

    def describe(self, key: CredentialKey) -> tuple[str, str]:
        """``(provider, key in words)`` for events; no secrets."""
        if key.account is not None:
            return key.provider, f"account={key.account}"
        return key.provider, f"scope={' '.join(key.scopes)}" if key.scopes else ""

    def timing(self, key: CredentialKey) -> Timing:
        """The refresh timing of the key's provider."""
        settings, defaults = self.settings.providers[key.provider], self.settings.defaults
        return Timing(
            skew=_pick(settings.skew_seconds, defaults.skew_seconds),
            refresh_ahead=_pick(settings.refresh_ahead, defaults.refresh_ahead),
            deadline=_pick(settings.deadline_seconds, defaults.deadline_seconds),
            invalidate_cooldown=_pick(
                settings.invalidate_cooldown_seconds, defaults.invalidate_cooldown_seconds
            ),
        )

    def policy(self, name: str) -> RetryPolicy:
        """The retry policy of a configured provider's token requests."""
        settings, defaults = self.settings.providers[name], self.settings.defaults
        return RetryPolicy(
            retries=_pick(settings.retries, defaults.retries),
            timeout=_pick(settings.timeout_seconds, defaults.timeout_seconds),
            deadline=_pick(settings.deadline_seconds, defaults.deadline_seconds),
            backoff=_pick(settings.backoff_seconds, defaults.backoff_seconds),
            max_response_bytes=defaults.max_response_bytes,
            max_resends=_max_resends(settings),
        )

    def grant(self, key: CredentialKey, refresh_token: Secret | None) -> Grant:
        """The grant that fetches a token for ``key`` (with the stored refresh token, if any)."""
        settings = self.settings.providers[key.provider]
        return kind_of(settings).build(
            key.provider, settings, key.scopes, key.account, refresh_token
        )

    def job(
        self,
        key: CredentialKey,
        stale: str | None,
        send: Callable[[Grant, RetryPolicy], Exchange],
    ) -> RefreshJob:
        """The refresher's job for one fetch of ``key``.

        Args:
            key: The key to fetch.
            stale: The access token the fetch replaces, if any.
            send: Sends a grant's requests under a policy.

        Returns:
            The job: its row, the settings digest, lease, rotation rules and grant builder.
        """
        settings = self.settings.providers[key.provider]
        timing = self.timing(key)
        policy = self.policy(key.provider)
        row_id, digest = credential_row(key.provider, settings, key.scopes, key.account)
        kind = kind_of(settings)
        rotation = kind.rotation(settings)
        lease = _pick(self.settings.defaults.lease_seconds, 2 * policy.deadline + 10)
        return RefreshJob(
            row_id=row_id,
            provider=key.provider,
            fingerprint=digest,
            build=functools.partial(self.grant, key),
            send=send,
            policy=policy,
            skew=timing.skew,
            lease_seconds=max(lease, 2 * policy.deadline + 2),
            seed=kind.seed(settings),
            single_use=rotation is not None and rotation.single_use,
            reuse_grace=rotation.reuse_grace_seconds if rotation is not None else 0.0,
            stale=stale,
            scope=" ".join(key.scopes),
            account=key.account,
        )

    def _admit(
        self,
        provider: str,
        scopes: tuple[str, ...],
        configured: tuple[str, ...],
        limit: int | None,
    ) -> None:
        """Count ``scopes`` among the provider's scope sets, refusing one beyond ``max_scopes``.

        Raises:
            TooManyScopesError: A new set when the provider already has ``max_scopes``.
        """
        with self._scope_lock:
            known = self._scope_sets.setdefault(provider, {configured})
            if scopes in known:
                return
        maximum = _pick(limit, self.settings.defaults.max_scopes)
        admitted: bool | None = None
        if self._shared is not None:
            # Outside the lock (a network round trip); the set in Redis is the cluster's count.
            with contextlib.suppress(CoordinationUnavailableError):
                admitted = self._shared.admit(
                    f"scopes:{provider}", _member(scopes), _member(configured), maximum
                )
        with self._scope_lock:
            if admitted is None and scopes not in known and len(known) >= maximum:
                admitted = False
            if admitted is False:
                raise TooManyScopesError(
                    f"provider {provider!r} already serves its maximum number of scope sets"
                )
            known.add(scopes)


def _member(scopes: tuple[str, ...]) -> str:
    """A scope set as a shared set's member (``s:`` keeps the empty set non-empty)."""
    return "s:" + " ".join(scopes)


def scope_alias(scope: object) -> str | None:
    """A cache alias for ``scope``: a string or None as it is, a collection in canonical form.

    Raises:
        InvalidScopeError: Neither a string nor a collection of scope-tokens.
    """
    if scope is None or isinstance(scope, str):
        return scope
    return scope_string(scope)


def _pick(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _max_resends(settings: Provider) -> int | None:
    rotation = kind_of(settings).rotation(settings)
    strict = rotation is not None and rotation.single_use and not rotation.reuse_grace_seconds
    return 1 if strict else None
