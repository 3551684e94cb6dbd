"""Delegated tokens: short-lived, audience- and object-bound, never cached, never refreshable.

Two modes, per provider (``delegation:`` in its config):

* ``jwt`` — the broker signs a JWT itself (EdDSA/Ed25519 or ES256, with PyJWT on
  ``cryptography``). Signing keys are generated once, kept encrypted in the store
  (so every process signs with the same keys), and published as a JWKS.
* ``upstream`` — the broker asks a delegation endpoint with its own service token
  for the provider (the seed's ``POST {issuer}/file-access/download-tokens``). The
  request and reply go through the same grant/retry machinery as token requests,
  so errors are classified by the same table.

A minted token names who asked and for whom: ``sub`` is the subject (the consumer's own
unless it may delegate as others, see :mod:`tokenbroker.engine.consumers`), ``azp`` and
``act.sub`` (RFC 8693 §4.1) the consumer. Its ``iss`` is the provider's
(:func:`issuer_for`), so a token minted for one provider does not verify as another's even
when both list the same audience. Its ``obj`` is a safe relative path (:func:`check_object`,
the same check as redirect paths). Its ``iat``/``nbf``/``exp`` and the bound on its lifetime
are read from an injected :class:`~tokenbroker.core.clock.Clock` (default: the system's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ..config import JwtDelegation, UpstreamDelegation
from ..core.clock import Clock, SystemClock
from ..core.token import Token
from ..errors import (
    ClientAuthenticationError,
    DelegationFailedError,
    InvalidDelegationError,
    ProviderUnavailableError,
    UnknownProviderError,
)
from ..grants import Exchange, Reply, TokenResponse, _dig, token_at
from ..store import SigningKeyStore

__all__ = [
    "DelegatedToken",
    "Signer",
    "UpstreamDelegationGrant",
    "bound_lifetime",
    "check_audience",
    "check_object",
    "delegated_from",
    "fill_template",
    "issuer_for",
    "safe_object",
    "settings_for",
]

_SYSTEM_CLOCK = SystemClock()
_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
#: A placeholder's value: its JSON type is kept when it fills a whole string.
JsonScalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True, repr=False)
class DelegatedToken:
    """A delegated token for one audience (and object).

    Attributes:
        token: The token value.
        token_type: Usually ``Bearer``.
        expires_at: Unix seconds.
        audience: Who it is for.
        object: The object it is bound to, if any.
        jti: The JWT ID of a minted token (for audit lines); None for an upstream one.
    """

    token: str
    token_type: str
    expires_at: float
    audience: str
    object: str | None
    jti: str | None = None

    @property
    def expires_in(self) -> int:
        """Whole seconds left (0 when past), by the system wall clock."""
        return self.seconds_left(_SYSTEM_CLOCK)

    def seconds_left(self, clock: Clock) -> int:
        """Whole seconds left before ``expires_at`` (0 when past), by ``clock``'s wall time.

        Args:
            clock: The clock to read.

        Returns:
            ``expires_at - clock.time()`` rounded down, at least 0.
        """
        return max(0, int(self.expires_at - clock.time()))

    def __repr__(self) -> str:
        return f"DelegatedToken(audience={self.audience!r}, expires_at={self.expires_at:.0f})"


def bound_lifetime(
    requested: float | None,
    maximum: float,
    parent_expires_at: float | None = None,
    *,
    clock: Clock = _SYSTEM_CLOCK,
) -> float:
    """The lifetime to grant: as asked, never above the maximum or the parent's remaining life.

    Args:
        requested: Seconds asked for (None: the maximum).
        maximum: The configured cap.
        parent_expires_at: Expiry of the service token it derives from, if any.
        clock: Whose wall time the parent's remaining life is measured on.

    Returns:
        Seconds, at least 1.
    """
    lifetime = min(requested or maximum, maximum)
    if parent_expires_at is not None:
        lifetime = min(lifetime, parent_expires_at - clock.time())
    return max(1.0, math.floor(lifetime))


class Signer:
    """Signs delegated JWTs with keys kept (encrypted) in the store.

    Args:
        store: Where signing keys live.
        algorithm: ``EdDSA`` (Ed25519) or ``ES256`` (P-256).
        clock: Source of ``iat``, ``nbf`` and ``exp`` (default: the system's).
    """

    def __init__(
        self, store: SigningKeyStore, algorithm: str = "EdDSA", *, clock: Clock | None = None
    ) -> None:
        self._store = store
        self.algorithm = algorithm
        self._clock = clock or _SYSTEM_CLOCK
        self._lock = threading.Lock()
        self._keys: list[tuple[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"Signer(algorithm={self.algorithm!r})"

    def _loaded(self) -> list[tuple[str, Any]]:
        with self._lock:
            if self._keys is None:
                stored = self._store.signing_keys(self.algorithm)
                if not stored:
                    pem = _new_private_pem(self.algorithm)
                    kid = hashlib.sha256(pem).hexdigest()[:16]
                    self._store.add_signing_key(kid, self.algorithm, pem)
                    stored = self._store.signing_keys(self.algorithm)
                self._keys = [
                    (kid, serialization.load_pem_private_key(pem, None)) for kid, pem in stored
                ]
            return self._keys

    def sign(
        self,
        *,
        issuer: str,
        provider: str,
        audience: str,
        lifetime: float,
        subject: str | None,
        object_: str | None,
        actor: str | None = None,
    ) -> DelegatedToken:
        """Mint a JWT (RFC 7519) bound to ``audience`` and ``object_``.

        Args:
            issuer: ``iss`` (the provider's, :func:`issuer_for`).
            provider: The provider it is minted for.
            audience: ``aud``.
            lifetime: Seconds from now to ``exp``.
            subject: ``sub``, if any.
            object_: ``obj``, if any (checked by the caller, :func:`check_object`).
            actor: Who asked (the consumer): ``azp`` and RFC 8693 ``act: {sub}``; None for
                an embedded caller.

        Returns:
            The token; its ``jti`` is random, ``iat`` is the clock's wall time and ``exp``
            is ``iat + lifetime``.
        """
        kid, key = self._loaded()[0]
        now = int(self._clock.time())
        jti = secrets.token_urlsafe(16)
        claims: dict[str, Any] = {
            "iss": issuer,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
            "jti": jti,
        }
        if actor:
            claims["azp"] = actor
            claims["act"] = {"sub": actor}
        if subject:
            claims["sub"] = subject
        if object_:
            claims["obj"] = object_
        value = jwt.encode(claims, key, algorithm=self.algorithm, headers={"kid": kid})
        return DelegatedToken(value, "Bearer", float(now + int(lifetime)), audience, object_, jti)

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWK Set (RFC 7517)."""
        keys = []
        for kid, key in self._loaded():
            public = json.loads(
                jwt.algorithms.get_default_algorithms()[self.algorithm].to_jwk(key.public_key())
            )
            keys.append({**public, "kid": kid, "use": "sig", "alg": self.algorithm})
        return {"keys": keys}

    def verify(self, token: str, *, audience: str, issuer: str) -> dict[str, Any]:
        """Check a token this broker minted (for tests and upstreams in the same process).

        Raises:
            jwt.InvalidTokenError: For a bad signature, audience, issuer or expiry.
        """
        kid = jwt.get_unverified_header(token).get("kid")
        for known, key in self._loaded():
            if known == kid:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.public_key(),
                    algorithms=[self.algorithm],
                    audience=audience,
                    issuer=issuer,
                )
                return claims
        raise jwt.InvalidTokenError("unknown key id")


def _new_private_pem(algorithm: str) -> bytes:
    key: Any = (
        ed25519.Ed25519PrivateKey.generate()
        if algorithm == "EdDSA"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem


class UpstreamDelegationGrant:
    """A delegation request to an upstream endpoint, shaped as a grant for the retry drivers.

    Args:
        provider: The provider name.
        settings: The delegation settings.
        service_token: The broker's own token for the provider (of ``settings.scope``).
        values: Placeholder values (``{audience}``, ``{object}``, ``{subject}``, ``{consumer}``,
            ``{lifetime}``), each with its JSON type (:func:`fill_template`).
    """

    def __init__(
        self,
        provider: str,
        settings: UpstreamDelegation,
        service_token: Token,
        values: dict[str, JsonScalar],
    ) -> None:
        self.provider = provider
        self.settings = settings
        self._service_token = service_token
        self._values = values

    def __repr__(self) -> str:
        return f"UpstreamDelegationGrant(provider={self.provider!r})"

    def build_request(self) -> httpx.Request:
        """The POST to the delegation endpoint, authorised with the service token."""
        return httpx.Request(
            "POST",
            self.settings.url,
            headers={
                "Authorization": self._service_token.authorization,
                "Accept": "application/json",
                "Accept-Encoding": "identity",
            },
            json=fill_template(self.settings.body, self._values),
        )

    def parse_response(self, reply: Reply, issued_at: float) -> TokenResponse:
        """Take the delegated token from ``token_path`` (same error table as token requests).

        Its expiry is the earliest of: the lifetime asked for, ``expires_in_path`` seconds and
        ``expires_at_path`` (ISO-8601 or Unix seconds). A reply whose own expiry is already
        past is returned as it is (``lifetime`` at most 0): :func:`delegated_from` refuses it
        once the exchange has ended, so it is not retried as if the endpoint were down.

        Raises:
            ProviderError: As for :func:`~tokenbroker.grants.token_at`; an ``expires_in`` or
                ``expires_at`` that is not a number or time is a malformed reply
                (:class:`ProviderUnavailableError`).
        """
        body, token = token_at(
            reply, self.settings.token_path, f"{self.provider}: delegation endpoint", self.provider
        )
        lifetime = float(cast("int", self._values["{lifetime}"]))
        if self.settings.expires_in_path:
            told = _dig(body, self.settings.expires_in_path)
            if told is not None:
                lifetime = min(lifetime, self._seconds(told, "expires_in"))
        if self.settings.expires_at_path:
            at = _dig(body, self.settings.expires_at_path)
            if at is not None:
                lifetime = min(lifetime, self._instant(at) - issued_at)
        return TokenResponse(token=Token(token, "Bearer", issued_at + lifetime), lifetime=lifetime)

    def _seconds(self, value: object, what: str) -> float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value.strip())
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._malformed(what)
        if not math.isfinite(value):
            raise self._malformed(what)
        return float(value)

    def _instant(self, value: object) -> float:
        """Unix seconds of an ISO-8601 time (UTC when it has no offset) or a number."""
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value.strip())
            except ValueError:
                raise self._malformed("expires_at") from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return when.timestamp()
        return self._seconds(value, "expires_at")

    def _malformed(self, what: str) -> ProviderUnavailableError:
        return ProviderUnavailableError(
            f"{self.provider}: delegation endpoint answered a malformed {what}",
            provider=self.provider,
        )


def fill_template(node: Any, values: Mapping[str, JsonScalar]) -> Any:
    """The JSON body of a delegation request: ``node`` with its placeholders replaced.

    A string that is exactly one placeholder becomes the value itself, keeping its JSON type
    (``"{lifetime}"`` → ``300``; None → ``null``). In a longer string each placeholder is
    replaced by the value's text (None → empty). Unknown placeholders, numbers, booleans and
    nulls are kept as they are; replaced text is never scanned again.

    Args:
        node: The template (from ``delegation.body``).
        values: Placeholder (with its braces) → value.

    Returns:
        A new JSON-ready structure; ``node`` is not changed.
    """
    if isinstance(node, str):
        if node in values:
            return values[node]
        return _PLACEHOLDER.sub(lambda m: _text(values.get(m.group(0), m.group(0))), node)
    if isinstance(node, dict):
        return {k: fill_template(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [fill_template(v, values) for v in node]
    return node


def _text(value: JsonScalar) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def delegated_from(
    exchange: Exchange, provider: str, audience: str, object_: str | None
) -> DelegatedToken:
    """The delegated token of an ended delegation exchange, or why there is none.

    Args:
        exchange: The exchange with the delegation endpoint (retries done).
        provider: The provider name.
        audience: The token's audience.
        object_: The object it is bound to.

    Returns:
        The token.

    Raises:
        ClientAuthenticationError: The endpoint refused the service token (401/403): the
            caller may report that token and try once more with a new one.
        DelegationFailedError: The endpoint failed otherwise (an error status, no usable
            token, unreachable, too slow); its status and ``Retry-After`` are kept.
        ProviderUnavailableError: The endpoint's reply says the token has already expired
            (``expires_in`` ≤ 0 or an ``expires_at`` in the past): an error of the provider,
            never a token of one second.
    """
    error = exchange.error
    if isinstance(error, ClientAuthenticationError):
        raise error
    if error is not None:
        raise DelegationFailedError(
            f"{provider}: delegation endpoint failed ({error.code})",
            provider=provider,
            status_code=error.status_code,
            retry_after=getattr(error, "retry_after", None),
        )
    response = exchange.result()
    if response.lifetime <= 0:
        raise ProviderUnavailableError(
            f"{provider}: delegation endpoint answered a token that has already expired",
            provider=provider,
        )
    token = response.token
    return DelegatedToken(token.access_token, "Bearer", token.expires_at, audience, object_)


def issuer_for(issuer: str, provider: str) -> str:
    """The ``iss`` of the tokens minted for ``provider``: the configured issuer + ``/provider``.

    Verifiers check it (as well as ``aud``), so a token minted for one provider is refused
    by a verifier of another, even one that shares the audience.
    """
    return f"{issuer.rstrip('/')}/{provider}"


def safe_object(path: str) -> bool:
    """Whether ``path`` is a safe relative path for a delegated token's object (and a redirect's
    path): not empty, not absolute; no empty, ``.`` or ``..`` segments (a trailing ``/`` is
    fine), backslashes, control characters, or (double-)encoded dots, separators or NULs."""
    if not path or "\\" in path or any(ord(c) < 0x20 or c == "\x7f" for c in path):
        return False
    if any(code in path.lower() for code in ("%2e", "%2f", "%5c", "%00")):
        return False  # double-encoded separators or dots
    # A leading or doubled "/" would make a joined path absolute (os.path.join drops the base).
    parts = path.split("/")
    return all(part not in ("", ".", "..") for part in parts[:-1]) and parts[-1] not in (".", "..")


def check_object(object_: str | None) -> str | None:
    """Refuse an object that is not a safe relative path (:func:`safe_object`).

    Returns:
        ``object_``, unchanged (None stays None).

    Raises:
        InvalidDelegationError: The object is unsafe.
    """
    if object_ is not None and not safe_object(object_):
        raise InvalidDelegationError("a delegation's object must be a safe relative path")
    return object_


def check_audience(provider: str, audiences: tuple[str, ...], audience: str) -> None:
    """Refuse an audience the provider's delegation does not list.

    Raises:
        UnknownProviderError: Shown to consumers as the same 404 as an unknown provider.
    """
    if audience not in audiences:
        raise UnknownProviderError(f"provider {provider!r} does not delegate to that audience")


def settings_for(
    delegation: JwtDelegation | UpstreamDelegation | None, provider: str
) -> JwtDelegation | UpstreamDelegation:
    """The provider's delegation settings.

    Raises:
        UnknownProviderError: When the provider has none.
    """
    if delegation is None:
        raise UnknownProviderError(f"provider {provider!r} has no delegation")
    return delegation
