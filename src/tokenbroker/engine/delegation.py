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

import hashlib
import json
import math
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ..config import JwtDelegation, UpstreamDelegation
from ..core.clock import Clock, SystemClock
from ..core.token import Token
from ..errors import InvalidDelegationError, UnknownProviderError
from ..grants import Reply, TokenResponse, _dig, _fill, token_at
from ..store import SigningKeyStore

__all__ = [
    "DelegatedToken",
    "Signer",
    "UpstreamDelegationGrant",
    "bound_lifetime",
    "check_audience",
    "check_object",
    "issuer_for",
    "safe_object",
    "settings_for",
]

_SYSTEM_CLOCK = SystemClock()


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
        service_token: The broker's own token for the provider.
        values: Placeholder values (``{audience}``, ``{object}``, ``{subject}``, ``{consumer}``,
            ``{lifetime}``).
    """

    def __init__(
        self,
        provider: str,
        settings: UpstreamDelegation,
        service_token: Token,
        values: dict[str, str],
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
            json=_fill(self.settings.body, self._values),
        )

    def parse_response(self, reply: Reply, issued_at: float) -> TokenResponse:
        """Take the delegated token from ``token_path`` (same error table as token requests)."""
        body, token = token_at(
            reply, self.settings.token_path, f"{self.provider}: delegation endpoint", self.provider
        )
        lifetime = float(self._values["{lifetime}"])
        if self.settings.expires_in_path:
            told = _dig(body, self.settings.expires_in_path)
            if isinstance(told, int | float) and not isinstance(told, bool) and told > 0:
                lifetime = min(lifetime, float(told))
        return TokenResponse(token=Token(token, "Bearer", issued_at + lifetime), lifetime=lifetime)


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
