"""Client authentication methods of the test token endpoint (RFC 6749 §2.3).

* ``client_secret_basic``: replaces authlib's decoder, see
  :func:`decode_client_secret_basic`.
* ``client_secret_post`` and ``none``: authlib's built-ins.
* ``private_key_jwt`` (RFC 7523 §2.2, §3): authlib's ``JWTBearerClientAssertion`` with the
  token URL as the only audience, single-use ``jti`` and asymmetric algorithms only.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal
from urllib.parse import unquote_plus

from authlib.oauth2.rfc6749 import InvalidClientError
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from joserfc import jwk, jwt
from joserfc.errors import JoseError

from .records import TokenStore

__all__ = [
    "ASSERTION_ALGORITHMS",
    "TOKEN_AUTH_METHODS",
    "PrivateKeyJWT",
    "PublicKey",
    "authenticate_client_secret_basic",
    "decode_client_secret_basic",
    "load_public_key",
]

log = logging.getLogger("tokenbroker.testing")

#: Client authentication methods the token endpoint accepts (RFC 7591 §2).
TOKEN_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]

#: Signature algorithms accepted on client assertions: the asymmetric JWS algorithms
#: (RFC 7518 §3, RFC 9864); never ``none`` or HMAC. joserfc alone accepts only RS256/ES256.
ASSERTION_ALGORITHMS = [
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "Ed25519",
]

#: A ``private_key_jwt`` verification key: PEM text/bytes, a JWK dict or a key object.
PublicKey = str | bytes | Mapping[str, Any] | PublicKeyTypes


def decode_client_secret_basic(header: str | None) -> tuple[str, str] | None:
    """Decode ``client_secret_basic`` credentials per RFC 6749 §2.3.1.

    The client id and secret are each ``application/x-www-form-urlencoded`` (Appendix B)
    before being joined by ``:`` and base64-encoded. authlib 1.9.6 decodes them with
    ``unquote`` instead of ``unquote_plus`` (a ``+`` for a space stays ``+``) and lets a
    non-UTF-8 payload escape as ``UnicodeDecodeError``; this decoder does neither.

    Args:
        header: The ``Authorization`` header value, if any.

    Returns:
        ``(client_id, client_secret)``, or ``None`` when the header is absent, not Basic,
        or malformed.
    """
    if not header:
        return None
    scheme, _, param = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        return None
    return unquote_plus(client_id), unquote_plus(secret)


def authenticate_client_secret_basic(query_client: Callable[[str], Any], request: Any) -> Any:
    """authlib client-auth method for ``client_secret_basic`` using the RFC decoder.

    Args:
        query_client: Looks a client up by id.
        request: authlib's ``OAuth2Request``.

    Returns:
        The authenticated client, or ``None`` to let authlib try the next method.

    Raises:
        InvalidClientError: The client id is unknown (401).
    """
    credentials = decode_client_secret_basic(request.headers.get("Authorization"))
    if credentials is None or not credentials[0]:
        return None
    client_id, secret = credentials
    client = query_client(client_id)
    if client is None:
        raise InvalidClientError(
            status_code=401, description="The client does not exist on this server."
        )
    return client if client.check_client_secret(secret) else None


def load_public_key(key: PublicKey) -> Any:
    """Import a ``private_key_jwt`` verification key for authlib (a joserfc key).

    Args:
        key: A PEM public key (``str`` or ``bytes``), a JWK dict, or a ``cryptography``
            public key object (RSA, EC, Ed25519 or Ed448).

    Returns:
        The joserfc key.

    Raises:
        ValueError: The key cannot be loaded or its type is unsupported.
    """
    if isinstance(key, Mapping):
        if key.get("kty") not in ("RSA", "EC", "OKP"):
            raise ValueError(f"unsupported JWK key type: {key.get('kty')!r}")
        try:
            return jwk.import_key(dict(key))
        except (JoseError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"cannot import JWK: {error}") from error
    if isinstance(key, str | bytes):
        pem = key.encode("ascii") if isinstance(key, str) else key
        loaded = serialization.load_pem_public_key(pem)
    else:
        loaded = key
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    kty: Literal["RSA", "EC", "OKP"]
    if isinstance(loaded, rsa.RSAPublicKey):
        kty = "RSA"
    elif isinstance(loaded, ec.EllipticCurvePublicKey):
        kty = "EC"
    elif isinstance(loaded, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        kty = "OKP"
    else:
        raise ValueError(f"unsupported public key type: {type(loaded).__name__}")
    return jwk.import_key(pem, kty)


class PrivateKeyJWT(JWTBearerClientAssertion):  # type: ignore[misc]
    """``private_key_jwt`` (RFC 7523 §2.2, §3): aud is the token URL, jti single-use."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, store: TokenStore, token_url: Callable[[], str], leeway: int) -> None:
        """Configure the verifier.

        Args:
            store: Records seen ``jti`` values.
            token_url: Returns the token endpoint URL, the only accepted ``aud``.
            leeway: Seconds of clock skew tolerated on ``exp``, ``iat`` and ``nbf``.
        """
        super().__init__(validate_jti=True, leeway=leeway)
        self._store = store
        self._token_url = token_url

    def get_audiences(self) -> list[str]:
        return [self._token_url()]

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
        # authlib's version differs only by not passing ``algorithms``.
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=ASSERTION_ALGORITHMS)
        except JoseError as error:
            log.debug("client assertion rejected: %s", error.error)
            raise InvalidClientError(description=error.description) from error
        self.verify_claims(token.claims)
        return token.claims

    def validate_jti(self, claims: Mapping[str, Any], jti: Any) -> bool:
        return self._store.remember_jti(str(claims["sub"]), str(jti))

    def resolve_client_public_key(self, client: Any) -> Any:
        if client.public_key is None:
            raise InvalidClientError(description="The client has no registered public key.")
        return client.public_key
