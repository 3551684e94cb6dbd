"""A client for a remote broker's HTTP API, with the surface of :class:`~tokenbroker.Broker`.

``BrokerClient("http://broker:8750", api_key=...)`` offers ``get_token``,
``aget_token``, ``invalidate``, ``httpx_auth`` and ``requests_auth`` (DESIGN §3.2)
against ``/v1/tokens`` (DESIGN §3.3). It is the :class:`~tokenbroker.engine.cache.Fetcher`
of a local :class:`~tokenbroker.engine.cache.TokenCache`, so hits are lock-free and make
no HTTP call, a cold or expired key costs one broker request however many threads
and tasks ask, and tokens are refreshed ahead of expiry. A token's lifetime is the
broker's ``expires_in`` measured on the local clock, so clock differences between
the two hosts do not matter.

:meth:`BrokerClient.invalidate` is local and does no I/O (the async httpx adapter
calls it on the event loop): it drops the token if it is still the current one and
remembers it as rejected. The fetch that replaces a rejected token is
``POST /v1/tokens/{provider}/invalidate``, which makes the broker drop it too and
answers with the broker's current token — one broker call per rejected token.

Jobs (``start_job``, ``job``, ``jobs``, ``cancel_job``, ``retry_job``, ``stream``) come
from :mod:`tokenbroker.client.jobs`.

A broker's error answer maps back to the class its ``error.code`` names in the
table the API and the proxy answer from (:mod:`tokenbroker.edge.statuses`), so the
caller sees the broker's own error class; an answer without one of those codes (a
load balancer's, say) maps by status (:data:`STATUS_ERRORS`). Transport failures
and malformed replies are :class:`~tokenbroker.errors.ProviderUnavailableError`. The API key is a
:class:`~tokenbroker.core.secret.Secret`, revealed only into the ``Authorization``
header of each request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import ssl
import threading
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx

from ..core.clock import Clock, SystemClock
from ..core.names import BROKER_ERROR_CODE, PROVIDER_NAME
from ..core.scopes import scope_string
from ..core.secret import Secret
from ..core.token import Token
from ..edge.statuses import status_for_code
from ..engine.cache import Timing, TokenCache
from ..errors import (
    ClientAuthenticationError,
    InvalidJobParamsError,
    InvalidScopeError,
    ProviderError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    TokenBrokerError,
    UnknownProviderError,
)
from ..grants import TokenResponse, retry_after, transport_error, validate_token_value
from .adapters import AuthAdapters
from .jobs import JobsAPI
from .target import TokenTarget

if TYPE_CHECKING:
    pass

__all__ = ["STATUS_ERRORS", "BrokerClient"]

logger = logging.getLogger("tokenbroker.client")

#: Broker status → (domain error, what it means), for answers without a code of ours.
STATUS_ERRORS: dict[int, tuple[type[TokenBrokerError], str]] = {
    401: (ClientAuthenticationError, "the broker rejected the API key"),
    403: (ClientAuthenticationError, "the broker refused the API key"),
    404: (UnknownProviderError, "no such provider for this API key"),
    409: (ReauthorizationRequiredError, "the provider needs re-authorisation at the broker"),
    429: (ProviderUnavailableError, "the broker is rate limiting this API key"),
    500: (ProviderMisconfiguredError, "the broker reports the provider misconfigured"),
    503: (ProviderUnavailableError, "the provider or the broker is unavailable"),
}

_API_KEY = re.compile(r"[\x21-\x7e]{1,4096}\Z")
_MAX_ACCOUNT = 256
_MAX_BODY = 1 << 20


class _RequestKey(NamedTuple):
    """Keys the local cache: provider, scope and account as they are asked of the broker."""

    provider: str
    scope: str | None
    account: str | None


class BrokerClient(AuthAdapters, JobsAPI):
    """Tokens from a remote broker, cached locally; the same API as :class:`~tokenbroker.Broker`.

    It also starts and follows the broker's jobs (:class:`~tokenbroker.client.jobs.JobsAPI`:
    ``start_job``, ``job``, ``jobs``, ``cancel_job``, ``retry_job``, ``stream``).

    Args:
        url: The broker's base URL, e.g. ``http://broker:8750`` (a path prefix is kept).
        api_key: The consumer API key (``tbk_…``), sent as ``Authorization: Bearer``.
        skew: Seconds before a token's expiry after which it is not handed out.
        refresh_ahead: Fraction of a token's remaining life (as the broker reported it)
            after which the next caller starts a background refresh.
        timeout: Seconds for each phase of a broker request (connect, write, each read);
            a little over the broker's default 30 s deadline, so its own retries finish.
        verify: False, or an :class:`ssl.SSLContext` (e.g. with a private CA); default: certifi.
        transport: An httpx transport (tests inject faults here).
        clock: Time source for expiry decisions (tests inject a manual clock).

    Raises:
        ValueError: The URL is not ``http(s)://host[:port][/path]`` without credentials,
            query or fragment; the API key is empty or not visible ASCII; or a timing is
            out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | Secret,
        skew: float = 30.0,
        refresh_ahead: float = 0.8,
        timeout: float = 40.0,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.BaseTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        if not _API_KEY.match(key.reveal()):
            raise ValueError("api_key must be 1 to 4096 visible ASCII characters")
        base = httpx.URL(url)
        if base.scheme not in ("http", "https") or not base.host or base.userinfo:
            raise ValueError("url must be http(s)://host[:port][/path] without credentials")
        if base.query or base.fragment:
            raise ValueError("url must not have a query or a fragment")
        if skew < 0 or not 0 < refresh_ahead <= 1 or timeout <= 0:
            raise ValueError("need skew >= 0, 0 < refresh_ahead <= 1 and timeout > 0")
        self.url = str(base)
        self._api_key = key
        self._timing = Timing(skew=skew, refresh_ahead=refresh_ahead, deadline=timeout)
        self._http = httpx.Client(
            base_url=base,
            transport=transport,
            verify=verify,
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            headers={"Accept": "application/json"},
        )
        self._rejected: dict[_RequestKey, str] = {}
        self._rejected_lock = threading.Lock()
        self._clock: Clock = clock or SystemClock()
        self._cache: TokenCache[_RequestKey] = TokenCache(self, clock=self._clock)

    def __repr__(self) -> str:
        return f"BrokerClient({self.url!r})"

    # -- public API (the TokenSource protocol) ---------------------------------------------

    def get_token(
        self, provider: str, scope: str | Iterable[str] | None = None, *, account: str | None = None
    ) -> Token:
        """Return a valid access token; a cached one costs no HTTP call. Thread-safe.

        Args:
            provider: The provider's name at the broker.
            scope: Scopes (space-separated); default: the provider's configured scopes.
            account: For login providers, which account; default: the first.

        Returns:
            The token (``token.access_token`` is the value to send).

        Raises:
            ClientAuthenticationError: The broker rejected the API key.
            UnknownProviderError: No such provider, or not one this API key may use.
            ReauthorizationRequiredError: The provider's refresh token is dead.
            ProviderMisconfiguredError: The broker's client for the provider is misconfigured.
            ProviderUnavailableError: The provider or the broker is down, too slow, or
                answered something malformed (``retry_after`` says how long to wait).
            StoreError: The broker's store is unavailable.
        """
        return self._cache.get((provider, _joined(scope), account))

    async def aget_token(
        self, provider: str, scope: str | Iterable[str] | None = None, *, account: str | None = None
    ) -> Token:
        """Async :meth:`get_token`; a cache hit never yields to the event loop."""
        return await self._cache.aget((provider, _joined(scope), account))

    def invalidate(
        self,
        provider: str,
        access_token: str,
        scope: str | Iterable[str] | None = None,
        *,
        account: str | None = None,
    ) -> bool:
        """Drop ``access_token`` if it is still the current token (compare-and-invalidate).

        No I/O happens here. The next fetch for the key reports the token to the broker
        (``POST …/invalidate``) and installs the broker's current token from that answer.

        Args:
            provider: The provider's name.
            access_token: The token an upstream rejected.
            scope: As for :meth:`get_token`.
            account: As for :meth:`get_token`.

        Returns:
            True if it was current and was dropped (the next call fetches a new one).
        """
        raw = (provider, _joined(scope), account)
        key = self.resolve(raw)
        # Held across both steps so a fetch that sees the token as stale also sees it rejected.
        with self._rejected_lock:
            dropped = self._cache.invalidate(raw, access_token)
            if dropped:
                self._rejected[key] = access_token
        return dropped

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    async def aclose(self) -> None:
        """Wait for background refreshes started by async callers, then close."""
        await self._cache.aclose()
        self.close()

    # -- the cache's Fetcher ---------------------------------------------------------------

    def resolve(self, raw: Hashable) -> _RequestKey:
        """Canonical key for ``(provider, scope, account)``: scopes sorted, names checked.

        Raises:
            UnknownProviderError: A name the broker could never accept (no request is made).
        """
        provider: object
        scope: object
        account: object
        provider, scope, account = raw  # type: ignore[misc]
        if not isinstance(provider, str) or not PROVIDER_NAME.match(provider):
            raise UnknownProviderError("a provider name is 1-64 of a-z, 0-9, '_' and '-'")
        try:
            scope = scope_string(scope)  # blank means the broker's configured scopes, as None
        except InvalidScopeError as exc:
            raise InvalidScopeError(f"{provider}: {exc}") from None
        if account is not None and (
            not isinstance(account, str) or not 0 < len(account) <= _MAX_ACCOUNT
        ):
            raise UnknownProviderError(f"{provider}: account must be 1-{_MAX_ACCOUNT} chars")
        return _RequestKey(provider, scope, account)

    def describe(self, key: _RequestKey) -> tuple[str, str]:
        """``(provider, key in words)`` for events and logs; no secrets."""
        if key.account is not None:
            return key.provider, f"account={key.account}"
        return key.provider, f"scope={key.scope}" if key.scope is not None else ""

    def timing(self, key: _RequestKey) -> Timing:
        """The client's refresh timing (the same for every key)."""
        return self._timing

    def fetch(self, key: _RequestKey, stale: str | None) -> TokenResponse:
        """One broker request: report ``stale`` if it was rejected, else read it (cache calls this).

        Returns:
            The broker's current token, its lifetime being the broker's ``expires_in``.

        Raises:
            TokenBrokerError: Mapped from the broker's answer (see :data:`STATUS_ERRORS`).
        """
        with self._rejected_lock:
            rejected = self._rejected.get(key)
        report = (
            stale is not None
            and rejected is not None
            and hmac.compare_digest(stale.encode(), rejected.encode())
        )
        if report:
            logger.info("reporting a rejected token to the broker provider=%s", key.provider)
        status, headers, body = self._send(self._request(key, stale if report else None))
        response = _parse(key.provider, status, headers, body, self._clock.time())
        if report:
            with self._rejected_lock:
                if self._rejected.get(key) is rejected:
                    del self._rejected[key]
        return response

    async def afetch(self, key: _RequestKey, stale: str | None) -> TokenResponse:
        """:meth:`fetch` in a worker thread, so the event loop never blocks on the broker."""
        return await asyncio.to_thread(self.fetch, key, stale)

    # -- internals ---------------------------------------------------------------------------

    def _target(self, provider: str, scope: str | None, account: str | None) -> TokenTarget:
        self.resolve((provider, _joined(scope), account))  # malformed names fail now
        return TokenTarget(self, provider, _joined(scope), account)

    def _request(self, key: _RequestKey, rejected: str | None) -> httpx.Request:
        path = f"/v1/tokens/{key.provider}"
        if rejected is None:
            params = {
                name: value
                for name, value in (("scope", key.scope), ("account", key.account))
                if value is not None
            }
            request = self._http.build_request("GET", path, params=params)
        else:
            body: dict[str, str] = {"access_token": rejected}
            if key.scope is not None:
                body["scope"] = key.scope
            if key.account is not None:
                body["account"] = key.account
            request = self._http.build_request("POST", f"{path}/invalidate", json=body)
        request.headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        request.extensions["tokenbroker.provider"] = key.provider
        return request

    def _send(self, request: httpx.Request) -> tuple[int, httpx.Headers, bytes]:
        provider: str = request.extensions["tokenbroker.provider"]
        try:
            response = self._http.send(request, stream=True)
            try:
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > _MAX_BODY:
                        raise ProviderUnavailableError(
                            f"{provider}: the broker's reply exceeds the size limit",
                            provider=provider,
                            status_code=response.status_code,
                        )
                    chunks.append(chunk)
            finally:
                response.close()
        except httpx.HTTPError as exc:
            raise transport_error(exc, provider, "the broker") from exc
        return response.status_code, response.headers, b"".join(chunks)


def _joined(scope: str | Iterable[str] | None) -> str | None:
    """A cache alias for ``scope``: a string or None as it is, a collection in canonical form."""
    if scope is None or isinstance(scope, str):
        return scope
    return scope_string(scope)


def _parse(
    provider: str, status: int, headers: httpx.Headers, body: bytes, now: float
) -> TokenResponse:
    """Turn the broker's answer into a token (``expires_at`` counted from ``now``, the
    client's wall time), or raise the mapped domain error."""
    if status != 200:
        raise _status_error(provider, status, headers, body)
    data = _json(body)
    if not isinstance(data, dict):
        raise _malformed(provider)
    access_token = validate_token_value(
        data.get("access_token"), provider=provider, what="access_token"
    )
    token_type = validate_token_value(data.get("token_type"), provider=provider, what="token_type")
    lifetime = data.get("expires_in")
    scope = data.get("scope")
    if (
        not isinstance(lifetime, int | float)
        or isinstance(lifetime, bool)
        or not math.isfinite(lifetime)
        or lifetime <= 0
        or not (scope is None or isinstance(scope, str))
    ):
        raise _malformed(provider)
    token = Token(access_token, token_type, now + lifetime, scope)
    return TokenResponse(token=token, lifetime=float(lifetime))


def _status_error(
    provider: str, status: int, headers: httpx.Headers, body: bytes
) -> TokenBrokerError:
    code = _error_code(body)
    row = status_for_code(code)
    if row is not None and row.status == status:  # the broker's own answer: its error class
        kind, meaning = row.error, row.message
    else:
        kind, meaning = STATUS_ERRORS.get(status) or (
            (ProviderUnavailableError, "the broker failed")
            if status >= 500
            else (ProviderMisconfiguredError, "unexpected answer (redirects are not followed)")
        )
    message = f"{provider}: {meaning} (HTTP {status}{f' {code}' if code else ''})"
    if issubclass(kind, ProviderUnavailableError):
        return kind(
            message,
            retry_after=retry_after(headers),
            provider=provider,
            status_code=status,
            error_code=code,
        )
    if issubclass(kind, ProviderError):
        return kind(message, provider=provider, status_code=status, error_code=code)
    if issubclass(kind, InvalidJobParamsError):
        return kind("", message)
    return kind(message)


def _error_code(body: bytes) -> str | None:
    """The ``error.code`` of an error body, if it is one of ours in shape; never free text."""
    data = _json(body)
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and BROKER_ERROR_CODE.match(code) else None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _malformed(provider: str) -> ProviderUnavailableError:
    return ProviderUnavailableError(
        f"{provider}: the broker's reply is malformed", provider=provider
    )
