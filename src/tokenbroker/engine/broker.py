"""The composition root: settings + grants (kinds, flow, driver) + cache, and the public Python API.

:class:`Broker` is what applications embed (DESIGN §3.2). It owns the HTTP
clients, the token cache, the refresh-token hand-off and the event bus; outer
layers (the HTTP service, metrics, the CLI) hold a broker and subscribe to its
events. Nothing here imports a web framework, metrics or CLI library. The rules it
applies per provider (keys, timing, retry policy, grants) are in
:mod:`~tokenbroker.engine.catalog`; the store it opens and the rows it names, in
:mod:`~tokenbroker.engine.credentials`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from collections.abc import Callable, Hashable

import httpx

from ..client.adapters import AuthAdapters
from ..client.target import TokenTarget
from ..config import JwtDelegation, Settings, load_settings
from ..core import tracing as _tracing
from ..core.clock import Clock
from ..core.events import Event, EventBus, RefreshTokenRotated
from ..core.rules import check_subject
from ..core.token import Token
from ..errors import ClientAuthenticationError, DelegationFailedError, ReauthorizationRequiredError
from ..grants import Exchange, Grant, RetryPolicy, TokenResponse, send_sync, token_flow
from ..store import Store
from . import acquisition
from .cache import TokenCache
from .catalog import CredentialKey, ProviderCatalog, scope_alias
from .coordination import Coordinator, SharedLimits
from .credentials import store_for
from .delegation import (
    DelegatedToken,
    JsonScalar,
    Signer,
    UpstreamDelegationGrant,
    bound_lifetime,
    check_audience,
    check_object,
    delegated_from,
    issuer_for,
    settings_for,
)
from .refresher import Refresher
from .revival import Revival
from .slot import SlotState, Timing, worst

__all__ = ["Broker"]


class Broker(AuthAdapters):
    """Obtains, caches and refreshes tokens for the configured providers.

    Args:
        settings: Validated settings (see :func:`tokenbroker.config.load_settings`).
        clock: Time source for expiry decisions (tests inject a manual clock).
        transport: httpx transport for token requests (tests inject faults here).
        store: An opened store (default: the one the settings name, see
            :func:`~tokenbroker.engine.credentials.store_for`).
        hook: Called with a crash-point name during refreshes (the crash benchmark).
        coordinator: Carries change notices between processes (see
            :mod:`~tokenbroker.engine.coordination`); default: Redis when ``settings.redis``
            is set (closed with the broker), else none (waiters poll the store).
        coordination_wait: With a coordinator, the longest wait for another process's
            "credential changed" notice before the store is read again (lost notices).

    Raises:
        ConfigError: ``redis`` is set but the ``redis`` extra is not installed.
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
        coordinator: Coordinator | None = None,
        coordination_wait: float = 0.5,
    ) -> None:
        self.settings = settings
        self.events = EventBus()
        self._owns_store = store is None
        self.store = store if store is not None else store_for(settings)
        self._owns_coordinator = coordinator is None and settings.redis is not None
        if coordinator is None and settings.redis is not None:
            from ..cluster import coordinator_for  # noqa: PLC0415 - only in cluster mode

            try:
                coordinator = coordinator_for(settings.redis, settings.store)
            except BaseException:
                if self._owns_store:
                    self.store.close()
                raise
        #: Change notices between processes (None: each process polls the store).
        self.coordinator = coordinator
        # Cluster mode: the invalidate cooldown, max_scopes and dropped tokens span replicas.
        shared = coordinator if isinstance(coordinator, SharedLimits) else None
        self._refresher = Refresher(
            self.store,
            hook=hook,
            clock=clock,
            coordinator=coordinator,
            wait_seconds=coordination_wait,
        )
        # One TLS context for every client: building one costs ~20 ms of CPU.
        self._http = httpx.Client(
            transport=transport,
            verify=httpx.create_ssl_context(),
            follow_redirects=False,
            trust_env=False,
        )
        self._cache: TokenCache[CredentialKey] = TokenCache(
            self,
            clock=clock,
            events=self.events,
            concurrency=settings.defaults.refresh_concurrency,
            shared=shared,
        )
        self._signers: dict[str, Signer] = {}
        self._catalog = ProviderCatalog(settings, shared=shared)
        self._revival = Revival(self.store, self._catalog, self._cache.reset)

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
            scope: Scopes, space-separated or a list; blank: the configured ones.
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
        key = (provider, alias := scope_alias(scope), account)
        try:
            if _tracing.tracer is None:
                return self._cache.get(key)
            return acquisition.get(self._cache, key, provider, alias, account)
        except ReauthorizationRequiredError:
            if not self._revival.revived(key):  # another process re-authorised it?
                raise
        return self._cache.get(key)

    async def aget_token(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> Token:
        """Async :meth:`get_token`; a cache hit never yields to the event loop."""
        key = (provider, alias := scope_alias(scope), account)
        try:
            if _tracing.tracer is None:
                return await self._cache.aget(key)
            return await acquisition.aget(self._cache, key, provider, alias, account)
        except ReauthorizationRequiredError:
            if not await asyncio.to_thread(self._revival.revived, key):
                raise
        return await self._cache.aget(key)

    def peek_token(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> Token | None:
        """The cached token if it is fresh, else None; never fetches, never blocks (a
        synchronous fast path for event-loop code before awaiting :meth:`aget_token`)."""
        try:
            return self._cache.peek((provider, scope, account))
        except TypeError:  # an unhashable scope
            return None

    def retry_in(
        self, provider: str, scope: str | None = None, *, account: str | None = None
    ) -> float:
        """Seconds until the cache asks the provider again after a remembered failure of
        this key (0.0 when none; ``math.inf`` after a reauthorization error); never fetches
        (:meth:`~tokenbroker.engine.cache.TokenCache.retry_in`)."""
        try:
            return self._cache.retry_in((provider, scope_alias(scope), account))
        except TypeError:  # an unhashable scope
            return 0.0

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
            provider: The provider's name. ``scope``/``account``: as for :meth:`get_token`.
            access_token: The token an upstream rejected.

        Returns:
            True if it was current and was dropped (the next call fetches a new one);
            False if it was not current, or if a token of this key was dropped less than
            ``invalidate_cooldown_seconds`` ago (the current token stays).
        """
        return self._cache.invalidate((provider, scope_alias(scope), account), access_token)

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

        Whether the caller may name ``subject`` is the HTTP layer's check; here only shapes.

        Args:
            provider: A provider with a ``delegation:`` section.
            audience: One of its delegation audiences.
            object_: The object the token is bound to (e.g. a file key): a safe relative path.
            subject: On whose behalf (e.g. a user id).
            lifetime: Seconds asked for; capped by ``max_lifetime_seconds`` (and, upstream,
                by the service token's remaining life).
            actor: Who asks (consumer name: ``azp``/``act.sub``, a template's ``{consumer}``).

        Returns:
            The delegated token.

        Raises:
            UnknownProviderError: Unknown provider, no delegation, or an audience it does not list.
            InvalidDelegationError: ``object_`` is not a safe relative path, or ``subject`` or
                ``actor`` is malformed.
            ProviderError: Upstream mode: the service token's failure, DelegationFailedError
                (the endpoint failed) or ProviderUnavailableError (its reply had expired).
        """
        check_object(object_)
        for name in (subject, actor):
            if name is not None:
                check_subject(name)
        spec = settings_for(self._catalog.provider(provider).delegation, provider)
        check_audience(provider, spec.audiences, audience)
        if isinstance(spec, JwtDelegation):
            return self._signer(spec.algorithm).sign(
                issuer=issuer_for(spec.issuer, provider),
                provider=provider,
                audience=audience,
                lifetime=bound_lifetime(
                    lifetime, spec.max_lifetime_seconds, clock=self._refresher.clock
                ),
                subject=subject,
                object_=object_,
                actor=actor,
            )
        for attempt in (1, 2):
            # The delegation's own scope, with the provider's client (no second provider).
            service = self.get_token(provider, spec.scope)
            granted = bound_lifetime(
                lifetime, spec.max_lifetime_seconds, service.expires_at, clock=self._refresher.clock
            )
            values: dict[str, JsonScalar] = {
                "{audience}": audience,
                "{object}": object_,
                "{subject}": subject,
                "{consumer}": actor,
                "{lifetime}": int(granted),
            }
            grant = UpstreamDelegationGrant(provider, spec, service, values)
            try:
                return delegated_from(
                    self._send(grant, self._catalog.policy(provider)), provider, audience, object_
                )
            except ClientAuthenticationError as refused:
                # The service token may have been revoked: report it and try once more.
                if attempt == 1 and self.invalidate(provider, service.access_token, spec.scope):
                    continue
                raise DelegationFailedError(
                    f"{provider}: delegation endpoint refused the service token",
                    provider=provider,
                    status_code=refused.status_code,
                ) from None
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
            signer = self._signers.setdefault(
                algorithm, Signer(self.store, algorithm, clock=self._refresher.clock)
            )
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

    def degraded(self) -> dict[str, str]:
        """The parts the broker runs without right now, by component, with the reason (e.g.
        ``{"redis": "redis unreachable: TimeoutError"}``); never a URL or a secret."""
        reason = self.coordinator.degraded() if self.coordinator is not None else None
        return {"redis": reason} if reason is not None else {}

    def required(self) -> list[str]:
        """The names of the ``required: true`` providers, sorted."""
        return self._catalog.required()

    def unready(self) -> list[str]:
        """The required providers (sorted) without a token to hand out for their configured
        scopes (login providers: their first account); empty when ready. Never fetches."""
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
        for name in self.settings.providers:
            accounts: list[str | None] = [*self._catalog.accounts(name)] or [None]
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
        return self._catalog.accounts(provider)

    def close(self) -> None:
        """Drop queued background refreshes, close the HTTP client and the store (if the
        broker opened it)."""
        self._cache.close()
        self._http.close()
        if self._owns_coordinator and self.coordinator is not None:
            self.coordinator.close()
        if self._owns_store:
            self.store.close()

    async def aclose(self) -> None:
        """Wait for background refreshes started by async callers, then close."""
        await self._cache.aclose()
        self.close()

    # -- the cache's Fetcher ---------------------------------------------------------------

    def resolve(self, raw: Hashable) -> CredentialKey:
        """Canonical cache key for ``(provider, scope, account)`` (the cache calls this); see
        :meth:`ProviderCatalog.resolve <tokenbroker.engine.catalog.ProviderCatalog.resolve>`."""
        return self._catalog.resolve(raw)

    def describe(self, key: CredentialKey) -> tuple[str, str]:
        """``(provider, key in words)`` for events; no secrets."""
        return self._catalog.describe(key)

    def timing(self, key: CredentialKey) -> Timing:
        """The refresh timing of the key's provider."""
        return self._catalog.timing(key)

    def fetch(self, key: CredentialKey, stale: str | None) -> TokenResponse:
        """Obtain a token for ``key`` through the fenced refresh protocol (the cache calls this)."""
        response = self._refresher.run(self._catalog.job(key, stale, self._send))
        if response.issued_at is None:  # fetched here, not read from the store
            if response.refresh_token is not None:
                provider, words = self.describe(key)
                self.events.emit(RefreshTokenRotated(provider, words))
            # Lifetime from when the request was sent, not when the fetch began (an outage).
            sent = response.token.expires_at - response.lifetime
            response = dataclasses.replace(response, issued_at=sent)
        return response

    async def afetch(self, key: CredentialKey, stale: str | None) -> TokenResponse:
        """:meth:`fetch` in a worker thread, so the store's blocking calls stay off the loop."""
        return await asyncio.to_thread(self.fetch, key, stale)

    # -- internals ---------------------------------------------------------------------------

    def _target(self, provider: str, scope: str | None, account: str | None) -> TokenTarget:
        self._catalog.resolve((provider, scope, account))  # unknown names fail now
        return TokenTarget(self, provider, scope, account)

    def _send(self, grant: Grant, policy: RetryPolicy) -> Exchange:
        clock = self._refresher.clock  # the broker's injected clock, or the system's
        return send_sync(
            self._http,
            token_flow(grant, policy, clock=clock),
            policy.max_response_bytes,
            clock=clock,
        )
