"""The composition root: settings + grants (kinds, flow, driver) + cache, and the public Python API.

:class:`Broker` is what applications embed (DESIGN §3.2). It owns the HTTP
clients, the token cache, the refresh-token hand-off and the event bus; outer
layers (the HTTP service, metrics, the CLI) hold a broker and subscribe to its
events. Nothing here imports a web framework, metrics or CLI library.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import httpx

from ..client.adapters import AuthAdapters
from ..client.target import TokenTarget
from ..config import MISSING_KEY, JwtDelegation, Provider, Settings, load_settings
from ..core.clock import Clock
from ..core.crypto import Keyring, generate_key
from ..core.events import Event, EventBus, RefreshTokenRotated
from ..core.rules import check_subject
from ..core.scopes import canonical_scopes, parse_scope, scope_string
from ..core.secret import Secret
from ..core.token import Token
from ..errors import (
    ClientAuthenticationError,
    EncryptionKeyError,
    TooManyScopesError,
    UnknownProviderError,
)
from ..grants import Exchange, Grant, RetryPolicy, TokenResponse, kind_of, send_sync, token_flow
from ..store import Store, is_persistent
from ..store import open_store as _open_url
from .cache import SlotState, Timing, TokenCache, worst
from .delegation import (
    DelegatedToken,
    Signer,
    UpstreamDelegationGrant,
    bound_lifetime,
    check_audience,
    check_object,
    issuer_for,
    settings_for,
)
from .refresher import Refresher, RefreshJob, fingerprint

if TYPE_CHECKING:
    pass

__all__ = ["STALE_KEY", "Broker", "credential_label", "credential_row", "open_store"]

_T = TypeVar("_T", int, float)


def open_store(settings: Settings) -> Store:
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


class _Key(NamedTuple):
    provider: str
    scopes: tuple[str, ...]
    account: str | None


class Broker(AuthAdapters):
    """Obtains, caches and refreshes tokens for the configured providers.

    Args:
        settings: Validated settings (see :func:`tokenbroker.config.load_settings`).
        clock: Time source for expiry decisions (tests inject a manual clock).
        transport: httpx transport for token requests (tests inject faults here).
        store: An opened store (default: the one the settings name, see :func:`open_store`).
        hook: Called with a crash-point name during refreshes (the crash benchmark).

    Raises:
        EncryptionKeyError: Stored secrets need a key that is not configured.
        StoreError: The store cannot be opened.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        transport: httpx.BaseTransport | None = None,
        store: Store | None = None,
        hook: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.events = EventBus()
        self._owns_store = store is None
        self.store = store if store is not None else open_store(settings)
        self._refresher = Refresher(self.store, hook=hook, clock=clock)
        # One TLS context for every client: building one costs ~20 ms of CPU.
        self._http = httpx.Client(
            transport=transport,
            verify=httpx.create_ssl_context(),
            follow_redirects=False,
            trust_env=False,
        )
        self._cache: TokenCache[_Key] = TokenCache(
            self,
            clock=clock,
            events=self.events,
            concurrency=settings.defaults.refresh_concurrency,
        )
        self._signers: dict[str, Signer] = {}
        # Scope sets admitted per provider (bounded by max_scopes), and the lock guarding them.
        self._scope_sets: dict[str, set[tuple[str, ...]]] = {}
        self._scope_lock = threading.Lock()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **kwargs: object) -> Broker:
        """Build a broker from a YAML config file.

        Args:
            path: The file; default ``$TOKENBROKER_CONFIG`` or ``tokenbroker.yaml``.
            **kwargs: Passed to :class:`Broker`.

        Returns:
            The broker.

        Raises:
            ConfigError: Listing every problem (missing variables by name).
        """
        return cls(load_settings(path), **kwargs)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Broker(providers={sorted(self.settings.providers)})"

    # -- public API ------------------------------------------------------------------------

    def get_token(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> Token:
        """Return a valid access token, fetching it only when needed. Thread-safe.

        Args:
            provider: The provider's configured name.
            scope: Scopes, space-separated or as a list; absent or blank means the
                provider's configured scopes (see :mod:`tokenbroker.core.scopes`).
            account: For login providers, which account; default: the first.

        Returns:
            The token (``token.access_token`` is the value to send).

        Raises:
            ProviderError: Classified failure when no valid token could be obtained.
            UnknownProviderError: Unknown provider, account, or a scope it cannot serve;
                :class:`~tokenbroker.errors.InvalidScopeError` for a malformed scope,
                :class:`~tokenbroker.errors.TooManyScopesError` for a new scope set beyond
                the provider's ``max_scopes``.
        """
        return self._cache.get((provider, _hashable(scope), account))

    async def aget_token(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> Token:
        """Async :meth:`get_token`; a cache hit never yields to the event loop."""
        return await self._cache.aget((provider, _hashable(scope), account))

    def peek_token(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> Token | None:
        """The cached token if it is fresh, else None; never fetches, never blocks.

        For event-loop code that wants a synchronous fast path before awaiting
        :meth:`aget_token`.
        """
        try:
            return self._cache.peek((provider, scope, account))
        except TypeError:  # an unhashable scope
            return None

    def peeker(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> Callable[[], Token | None]:
        """:meth:`peek_token` bound to one key, for a caller that asks very often."""
        return functools.partial(self._cache.peek, (provider, scope, account))

    def invalidate(
        self,
        provider: str,
        access_token: str,
        scope: str | None = None,
        *,
        account: str | None = None,
    ) -> bool:
        """Drop ``access_token`` if it is still the current token (compare-and-invalidate).

        Args:
            provider: The provider's name.
            access_token: The token an upstream rejected.
            scope: As for :meth:`get_token`.
            account: As for :meth:`get_token`.

        Returns:
            True if it was current and was dropped (the next call fetches a new one);
            False if it was not current, or if a token of this key was dropped less than
            ``invalidate_cooldown_seconds`` ago (the current token stays).
        """
        return self._cache.invalidate((provider, _hashable(scope), account), access_token)

    def delegate(
        self,
        provider: str,
        audience: str,
        *,
        object_: str | None = None,
        subject: str | None = None,
        lifetime: float | None = None,
        actor: str | None = None,
    ) -> DelegatedToken:
        """Mint (or obtain upstream) a short-lived delegated token; never cached.

        Whether the caller may name ``subject`` is the HTTP layer's check (consumer rules);
        here the values are only checked for shape.

        Args:
            provider: A provider with a ``delegation:`` section.
            audience: One of its delegation audiences.
            object_: The object the token is bound to (e.g. a file key): a safe relative path.
            subject: On whose behalf (e.g. a user id).
            lifetime: Seconds asked for; capped by ``max_lifetime_seconds`` (and, upstream,
                by the service token's remaining life).
            actor: Who asks (the consumer's name): a minted token's ``azp`` and ``act.sub``,
                an upstream template's ``{consumer}``; None for an embedded caller.

        Returns:
            The delegated token.

        Raises:
            UnknownProviderError: Unknown provider, no delegation, or an audience it does not list.
            InvalidDelegationError: ``object_`` is not a safe relative path, or ``subject`` or
                ``actor`` is malformed.
            ProviderError: Upstream mode: the delegation endpoint's classified failure.
        """
        check_object(object_)
        for name in (subject, actor):
            if name is not None:
                check_subject(name)
        spec = settings_for(self._provider(provider).delegation, provider)
        check_audience(provider, spec.audiences, audience)
        if isinstance(spec, JwtDelegation):
            return self._signer(spec.algorithm).sign(
                issuer=issuer_for(spec.issuer, provider),
                provider=provider,
                audience=audience,
                lifetime=bound_lifetime(lifetime, spec.max_lifetime_seconds),
                subject=subject,
                object_=object_,
                actor=actor,
            )
        for attempt in (1, 2):
            service = self.get_token(provider)
            granted = bound_lifetime(lifetime, spec.max_lifetime_seconds, service.expires_at)
            values = {
                "{audience}": audience,
                "{object}": object_ or "",
                "{subject}": subject or "",
                "{consumer}": actor or "",
                "{lifetime}": str(int(granted)),
            }
            grant = UpstreamDelegationGrant(provider, spec, service, values)
            try:
                reply = self._send(grant, self._policy(self.settings.providers[provider])).result()
            except ClientAuthenticationError:
                # The service token may have been revoked: report it and try once more.
                if attempt == 2 or not self.invalidate(provider, service.access_token):
                    raise
                continue
            return DelegatedToken(
                reply.token.access_token, "Bearer", reply.token.expires_at, audience, object_
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def adelegate(
        self,
        provider: str,
        audience: str,
        *,
        object_: str | None = None,
        subject: str | None = None,
        lifetime: float | None = None,
        actor: str | None = None,
    ) -> DelegatedToken:
        """:meth:`delegate` in a worker thread (it may touch the store and the network)."""
        return await asyncio.to_thread(
            functools.partial(
                self.delegate,
                provider,
                audience,
                object_=object_,
                subject=subject,
                lifetime=lifetime,
                actor=actor,
            )
        )

    def jwks(self) -> dict[str, object]:
        """Public keys of every delegation signer in use, as one JWK Set."""
        keys: list[object] = []
        algorithms = {
            p.delegation.algorithm
            for p in self.settings.providers.values()
            if isinstance(p.delegation, JwtDelegation)
        }
        for algorithm in sorted(algorithms):
            keys.extend(self._signer(algorithm).jwks()["keys"])
        return {"keys": keys}

    def _signer(self, algorithm: str) -> Signer:
        signer = self._signers.get(algorithm)
        if signer is None:
            signer = self._signers.setdefault(algorithm, Signer(self.store, algorithm))
        return signer

    def subscribe(self, subscriber: Callable[[Event], None]) -> Callable[[], None]:
        """Receive every :class:`~tokenbroker.core.events.Event`; returns an unsubscribe
        function."""
        return self.events.subscribe(subscriber)

    def refresh_due(self) -> int:
        """Keep tokens warm: start background refreshes for every token past its refresh-ahead
        point, and fetches for ``required: true`` providers that have no token for their
        configured scopes (the first call fetches them; later calls retry after a failure's
        backoff). Never blocks: at most ``defaults.refresh_concurrency`` run at once.

        Returns:
            How many refreshes were started.
        """
        started = self._cache.refresh_due()
        for name in self.required():
            started += self._cache.prefetch((name, None, None))
        return started

    def required(self) -> list[str]:
        """The names of the ``required: true`` providers, sorted."""
        return sorted(name for name, p in self.settings.providers.items() if p.required)

    def unready(self) -> list[str]:
        """The required providers without a token to hand out for their configured scopes
        (login providers: their first account); tokens consumers asked for with other
        scopes or accounts do not count. Never fetches.

        Returns:
            Their names, sorted; empty when the broker is ready.
        """
        return [name for name in self.required() if not self._cache.usable((name, None, None))]

    def provider_states(self) -> dict[str, str]:
        """Each provider's worst state (see :meth:`provider_summaries`); never fetches."""
        return {name: state.state for name, state in self.provider_summaries().items()}

    def provider_summaries(self) -> dict[str, SlotState]:
        """Each provider's worst key among those that matter: its configured scopes, and every
        account of a login provider (a pool). Keys for scopes consumers chose do not count: a
        consumer cannot make a provider look failed by asking for a scope it is refused.

        Returns:
            By provider name, the :class:`SlotState` of its worst key (``empty`` for a key
            the cache has not seen); never fetches, never a secret.
        """
        out = {}
        for name, settings in self.settings.providers.items():
            accounts: list[str | None] = [*kind_of(settings).accounts(settings)] or [None]
            states = []
            for account in accounts:
                state = self._cache.state((name, None, account))
                states.append(state or SlotState(name, "", "empty", None, None, None))
            out[name] = worst(states)
        return out

    def states(self) -> list[SlotState]:
        """What the cache knows per provider key (never a secret)."""
        return self._cache.states()

    def accounts(self, provider: str) -> list[str]:
        """The account names of a login provider (empty for other grants).

        Raises:
            UnknownProviderError: For an unknown provider.
        """
        settings = self._provider(provider)
        return list(kind_of(settings).accounts(settings))

    def close(self) -> None:
        """Drop queued background refreshes, close the HTTP client and the store (if the
        broker opened it)."""
        self._cache.close()
        self._http.close()
        if self._owns_store:
            self.store.close()

    async def aclose(self) -> None:
        """Wait for background refreshes started by async callers, then close."""
        await self._cache.aclose()
        self.close()

    # -- the cache's Fetcher ---------------------------------------------------------------

    def resolve(self, raw: Hashable) -> _Key:
        """Canonical cache key for ``(provider, scope, account)`` (the cache calls this)."""
        return self._resolve(raw)

    def describe(self, key: _Key) -> tuple[str, str]:
        """``(provider, key in words)`` for events; no secrets."""
        if key.account is not None:
            return key.provider, f"account={key.account}"
        return key.provider, f"scope={' '.join(key.scopes)}" if key.scopes else ""

    def timing(self, key: _Key) -> Timing:
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

    def fetch(self, key: _Key, stale: str | None) -> TokenResponse:
        """Obtain a token for ``key`` through the fenced refresh protocol (the cache calls this)."""
        settings = self.settings.providers[key.provider]
        timing = self.timing(key)
        policy = self._policy(settings)
        row_id, digest = credential_row(key.provider, settings, key.scopes, key.account)
        kind = kind_of(settings)
        rotation = kind.rotation(settings)
        lease = _pick(self.settings.defaults.lease_seconds, 2 * policy.deadline + 10)
        job = RefreshJob(
            row_id=row_id,
            provider=key.provider,
            fingerprint=digest,
            build=functools.partial(self._grant, key),
            send=self._send,
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
        response = self._refresher.run(job)
        if response.refresh_token is not None and response.issued_at is None:
            provider, words = self.describe(key)
            self.events.emit(RefreshTokenRotated(provider, words))
        return response

    async def afetch(self, key: _Key, stale: str | None) -> TokenResponse:
        """:meth:`fetch` in a worker thread, so the store's blocking calls stay off the loop."""
        return await asyncio.to_thread(self.fetch, key, stale)

    # -- internals ---------------------------------------------------------------------------

    def _target(self, provider: str, scope: str | None, account: str | None) -> TokenTarget:
        self._resolve((provider, scope, account))  # unknown names fail now, not at first use
        return TokenTarget(self, provider, scope, account)

    def _provider(self, name: str) -> Provider:
        try:
            return self.settings.providers[name]
        except (KeyError, TypeError):
            raise UnknownProviderError(f"unknown provider {name!r}") from None

    def _resolve(self, raw: Hashable) -> _Key:
        provider: str
        scope: object
        account: str | None
        provider, scope, account = raw  # type: ignore[misc]
        settings = self._provider(provider)
        kind = kind_of(settings)
        names = kind.accounts(settings)
        if names:  # a pool: keyed by account, never by scope
            parse_scope(scope)  # malformed is refused; a login has no scopes
            if account is None:
                account = names[0]
            elif account not in names:
                raise UnknownProviderError(f"provider {provider!r} has no account {account!r}")
            return _Key(provider, (), account)
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
        return _Key(provider, scopes, None)

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
            if len(known) >= _pick(limit, self.settings.defaults.max_scopes):
                raise TooManyScopesError(
                    f"provider {provider!r} already serves its maximum number of scope sets"
                )
            known.add(scopes)

    def _policy(self, settings: Provider) -> RetryPolicy:
        defaults = self.settings.defaults
        return RetryPolicy(
            retries=_pick(settings.retries, defaults.retries),
            timeout=_pick(settings.timeout_seconds, defaults.timeout_seconds),
            deadline=_pick(settings.deadline_seconds, defaults.deadline_seconds),
            backoff=_pick(settings.backoff_seconds, defaults.backoff_seconds),
            max_response_bytes=defaults.max_response_bytes,
            max_resends=_max_resends(settings),
        )

    def _grant(self, key: _Key, refresh_token: Secret | None) -> Grant:
        settings = self.settings.providers[key.provider]
        return kind_of(settings).build(
            key.provider, settings, key.scopes, key.account, refresh_token
        )

    def _send(self, grant: Grant, policy: RetryPolicy) -> Exchange:
        clock = self._refresher.clock  # the broker's injected clock, or the system's
        return send_sync(
            self._http,
            token_flow(grant, policy, clock=clock),
            policy.max_response_bytes,
            clock=clock,
        )


def _pick(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _max_resends(settings: Provider) -> int | None:
    rotation = kind_of(settings).rotation(settings)
    strict = rotation is not None and rotation.single_use and not rotation.reuse_grace_seconds
    return 1 if strict else None


def _hashable(scope: object) -> str | None:
    """A cache alias for ``scope``: a string or None as it is, a collection in canonical form.

    Raises:
        InvalidScopeError: Neither a string nor a collection of scope-tokens.
    """
    if scope is None or isinstance(scope, str):
        return scope
    return scope_string(scope)
