"""Re-authorisation of a refresh-token credential by a person: the engine half of the
``authorize`` job (authorization code + PKCE ``S256``, RFC 6749 §4.1, RFC 7636, RFC 9207).

:class:`Reauthorizer` does four things for the job layer, none of which needs the job
machinery:

* :meth:`~Reauthorizer.begin` makes a random single-use ``state``, a PKCE verifier and the
  authorization request URL, and returns what the job keeps in the store: the state only as
  its SHA-256, the verifier and the URL sealed with the store's encryption key (AES-GCM,
  bound to the job id), the expiry on the store's clock and the issuer rules found by
  discovery. Any process with the key can then finish the callback.
* :meth:`~Reauthorizer.exchange` swaps the code (one attempt: a code works once).
* :meth:`~Reauthorizer.install` stores the new refresh token through the same fenced write
  as a rotation: under the credential row's lease, the refresh-token version moves on
  (the old chain ends, open attempts are superseded, the state becomes ``active``), then the
  new access token is committed; the token cache forgets the key's remembered
  reauthorization error here and, in cluster mode, in every process.
* :meth:`~Reauthorizer.verify` asks the broker for the key's token (served from the store).

This module reaches into the broker's catalog, cache and HTTP client: it is the broker's
friend, kept apart so the broker module stays one concept.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ..config import RefreshTokenProvider
from ..config.providers import _check_url
from ..core.crypto import Keyring, generate_key
from ..core.secret import Secret
from ..errors import ProviderError, ProviderUnavailableError, StoreError
from ..grants import TokenResponse
from ..grants.authorization_code import (
    AuthorizationCodeGrant,
    authorization_request_url,
    pkce_pair,
)
from ..store import StoredToken
from .broker import Broker
from .coordination import credential_topic

__all__ = ["AuthorizationError", "Endpoints", "Reauthorizer"]

_DISCOVERY_BYTES = 256 * 1024
#: One key for stores that keep nothing past the process and were opened without a key.
_EPHEMERAL = Keyring([Secret(generate_key())])


class AuthorizationError(Exception):
    """Re-authorisation cannot go on; ``type`` is the job's snake-case error type and the
    message is secret-free (it may be shown on the callback page, escaped)."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the authorization request goes and what its answer must carry.

    Attributes:
        authorize_url: The authorization endpoint.
        issuer: The issuer identifier, when configured or discovered.
        iss_required: The server advertises ``authorization_response_iss_parameter_supported``
            (RFC 9207 §3): its answers must carry ``iss`` equal to ``issuer``.
    """

    authorize_url: str
    issuer: str | None
    iss_required: bool


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


def state_digest(state: str) -> str:
    """The SHA-256 (hex) under which a state is kept and looked up."""
    return hashlib.sha256(state.encode()).hexdigest()


class Reauthorizer:
    """The engine half of re-authorisation for one broker (see the module docstring).

    Args:
        broker: The broker whose credentials are re-authorised.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        keys = broker.settings.encryption_keys
        self._keyring = Keyring(keys) if keys else _EPHEMERAL

    def __repr__(self) -> str:
        return f"Reauthorizer(broker={self.broker!r})"

    def settings(self, provider: str) -> RefreshTokenProvider:
        """The provider's settings, if it can be re-authorised.

        Raises:
            AuthorizationError: ``not_authorizable``: not a refresh-token provider with an
                ``authorization`` block (or no longer configured).
        """
        spec = self.broker.settings.providers.get(provider)
        if not isinstance(spec, RefreshTokenProvider) or spec.authorization is None:
            raise AuthorizationError(
                "not_authorizable",
                f"{provider} is not a refresh_token provider with an authorization block",
            )
        return spec

    # -- starting -------------------------------------------------------------------------

    def endpoints(self, provider: str) -> Endpoints:
        """The authorization endpoint and the issuer rules, from the config and (with an
        ``issuer`` or ``discovery_url``) the server's metadata (RFC 8414 §3).

        Raises:
            AuthorizationError: ``discovery_failed`` with what was wrong.
        """
        block = self.settings(provider).authorization
        assert block is not None
        url = block.discovery_url
        if url is None and block.issuer is not None:
            url = block.issuer.rstrip("/") + "/.well-known/openid-configuration"
        meta: Mapping[str, Any] = {} if url is None else self._discover(provider, url)
        issuer = block.issuer or _text(meta.get("issuer"))
        found = _text(meta.get("issuer"))
        if block.issuer is not None and found is not None and found != block.issuer:
            # RFC 8414 §3.3: the document's issuer must be the one it was fetched for.
            raise AuthorizationError(
                "discovery_failed", f"{provider}: the discovery document names another issuer"
            )
        endpoint = block.authorize_url or _text(meta.get("authorization_endpoint"))
        if endpoint is None:
            raise AuthorizationError(
                "discovery_failed", f"{provider}: no authorization_endpoint in the metadata"
            )
        try:
            _check_url(endpoint, https_only=True)
        except ValueError as exc:
            raise AuthorizationError(
                "discovery_failed", f"{provider}: authorization_endpoint {exc}"
            ) from None
        required = meta.get("authorization_response_iss_parameter_supported") is True
        return Endpoints(endpoint, issuer, required and issuer is not None)

    def _discover(self, provider: str, url: str) -> Mapping[str, Any]:
        try:
            reply = self.broker._http.get(url, headers={"Accept": "application/json"}, timeout=10)
        except httpx.HTTPError:
            raise AuthorizationError(
                "discovery_failed", f"{provider}: the discovery document could not be fetched"
            ) from None
        if reply.status_code != 200 or len(reply.content) > _DISCOVERY_BYTES:
            raise AuthorizationError(
                "discovery_failed", f"{provider}: discovery answered {reply.status_code}"
            )
        try:
            body = json.loads(reply.content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise AuthorizationError(
                "discovery_failed", f"{provider}: the discovery document is not a JSON object"
            )
        return body

    def begin(self, provider: str, job_id: str) -> dict[str, Any]:
        """Start one authorisation for ``job_id``.

        Returns:
            The record the job keeps (JSON values; no secret in the clear): ``state_sha256``,
            ``url_sealed``, ``verifier_sealed``, ``expires_at`` (store clock), ``issuer``,
            ``iss_required``, ``redirect_uri``.

        Raises:
            AuthorizationError: Not authorisable, or discovery failed.
        """
        spec = self.settings(provider)
        block = spec.authorization
        assert block is not None
        found = self.endpoints(provider)
        state = secrets.token_urlsafe(32)
        verifier, challenge = pkce_pair()
        url = authorization_request_url(
            found.authorize_url,
            client_id=spec.client_id,
            redirect_uri=block.redirect_uri,
            scopes=block.scopes,
            state=state,
            challenge=challenge,
            params=block.params,
        )
        return {
            "state_sha256": state_digest(state),
            "url_sealed": _b64(self._keyring.encrypt(url.encode(), _aad(job_id, "url"))),
            "verifier_sealed": _b64(
                self._keyring.encrypt(verifier.encode(), _aad(job_id, "verifier"))
            ),
            "expires_at": self.broker.store.now() + block.expires_in_seconds,
            "issuer": found.issuer,
            "iss_required": found.iss_required,
            "redirect_uri": block.redirect_uri,
        }

    def authorize_url(self, job_id: str, record: Mapping[str, Any]) -> str | None:
        """The authorization request URL of a waiting job (None once its state is spent or
        when it cannot be opened, e.g. under a removed key)."""
        return self._open(job_id, record, "url")

    @staticmethod
    def state_matches(record: Mapping[str, Any], state: str) -> bool:
        """Whether ``state`` is the record's unspent state (constant-time compare)."""
        kept = record.get("state_sha256")
        return isinstance(kept, str) and hmac.compare_digest(kept, state_digest(state))

    def _open(self, job_id: str, record: Mapping[str, Any], what: str) -> str | None:
        sealed = record.get(f"{what}_sealed")
        if not isinstance(sealed, str):
            return None
        try:
            return self._keyring.decrypt(base64.b64decode(sealed), _aad(job_id, what)).decode()
        except Exception:  # tampered, or sealed under a key no longer configured
            return None

    # -- key rotation ---------------------------------------------------------------------

    def stale(self, record: Mapping[str, Any]) -> bool:
        """Whether the record holds a sealed value under a key other than the primary one
        (what ``rotate_key`` re-seals, so the old key can leave the config mid-flow)."""
        return any(
            self._keyring.needs_rotation(base64.b64decode(record[f"{what}_sealed"]))
            for what in _SEALED
            if isinstance(record.get(f"{what}_sealed"), str)
        )

    def reseal(self, job_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """The record with every sealed value re-encrypted under the primary key (the same
        job-bound associated data); values already under it are kept as they are.

        Raises:
            StoreCorruptError: A sealed value is tampered with or under an unknown key.
        """
        out = dict(record)
        for what in _SEALED:
            sealed = record.get(f"{what}_sealed")
            if not isinstance(sealed, str):
                continue
            blob = base64.b64decode(sealed)
            if self._keyring.needs_rotation(blob):
                aad = _aad(job_id, what)
                out[f"{what}_sealed"] = _b64(
                    self._keyring.encrypt(self._keyring.decrypt(blob, aad), aad)
                )
        return out

    # -- finishing ------------------------------------------------------------------------

    def exchange(
        self, provider: str, job_id: str, record: Mapping[str, Any], code: str
    ) -> TokenResponse:
        """Swap the code for tokens, once (a resent code would revoke what it issued).

        Returns:
            The reply; it holds a refresh token.

        Raises:
            AuthorizationError: ``exchange_failed`` (the provider's error code, never its
                body), or ``no_refresh_token``.
        """
        spec = self.settings(provider)
        verifier = self._open(job_id, record, "verifier")
        if verifier is None:
            raise AuthorizationError("exchange_failed", "the PKCE verifier cannot be opened")
        grant = AuthorizationCodeGrant(
            provider, spec, Secret(code), Secret(verifier), str(record.get("redirect_uri"))
        )
        policy = dataclasses.replace(self.broker._catalog.policy(provider), max_resends=0)
        try:
            response = self.broker._send(grant, policy).result()
        except ProviderError as exc:
            detail = exc.error_code or (f"HTTP {exc.status_code}" if exc.status_code else "")
            shown = f" ({detail})" if detail else ""
            raise AuthorizationError(
                "exchange_failed", f"{provider}: the code exchange failed{shown}"
            ) from None
        if response.refresh_token is None:
            raise AuthorizationError(
                "no_refresh_token",
                f"{provider}: the provider issued no refresh token (ask for offline_access"
                " with prompt=consent)",
            )
        return response

    def install(self, provider: str, account: str | None, response: TokenResponse) -> None:
        """Store the new refresh token and access token (see the module docstring).

        Raises:
            AuthorizationError: ``store_busy``: the credential's lease stayed held past the
                deadline; ``store_failed``: a fenced write lost (nothing half-written).
        """
        broker = self.broker
        refresh_token = response.refresh_token
        assert refresh_token is not None
        raw = (provider, None, account)
        key = broker._catalog.resolve(raw)
        job = broker._catalog.job(key, None, broker._send)
        store, owner = broker.store, broker._refresher.owner
        give_up = time.monotonic() + job.policy.deadline
        while (
            lease := store.acquire(
                job.row_id, provider, owner, job.lease_seconds, scope=job.scope, account=account
            )
        ) is None:
            if time.monotonic() > give_up:
                raise AuthorizationError("store_busy", f"{provider}: the credential stayed busy")
            time.sleep(0.05)
        try:
            moved = store.reseed(lease, refresh_token, job.seed_digest or "")
            stored = StoredToken(
                token=response.token,
                lifetime=response.lifetime,
                obtained_at=response.token.expires_at - response.lifetime,
                fingerprint=job.fingerprint,
            )
            if moved is None or not store.commit(moved, None, stored, seed_digest=job.seed_digest):
                raise AuthorizationError("store_failed", f"{provider}: fenced out of the store")
        except StoreError as exc:
            raise AuthorizationError("store_failed", f"{provider}: the store failed") from exc
        finally:
            with contextlib.suppress(StoreError):
                store.release(lease)
            if broker.coordinator is not None:
                broker.coordinator.publish(credential_topic(job.row_id))
        broker._cache.reauthorized(raw)

    def verify(self, provider: str, account: str | None) -> None:
        """The broker serves the key's token again.

        Raises:
            AuthorizationError: ``verify_failed``.
        """
        try:
            self.broker.get_token(provider, account=account)
        except (ProviderError, ProviderUnavailableError) as exc:
            raise AuthorizationError(
                "verify_failed", f"{provider}: no token after re-authorisation ({exc.code})"
            ) from None


#: The record's sealed values (``url_sealed``, ``verifier_sealed``).
_SEALED = ("url", "verifier")


def _aad(job_id: str, what: str) -> bytes:
    return f"tb_job/{job_id}/authorization/{what}".encode()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
