"""Status-page sessions: a signed, expiring cookie instead of the consumer key, and CSRF tokens.

``EventSource`` cannot send an ``Authorization`` header, so the page works on a session. The
operator pastes a consumer key with the ``admin`` rule once (``POST /ui/login``); the server
checks it like any key (same failed-key throttling) and sets a cookie holding

    base64url(JSON {"c": consumer name, "k": tag of its key digest, "e": expiry, "n": nonce})
    "." base64url(HMAC-SHA256(signing key, that JSON))

never the key. The tag (an HMAC of the key's SHA-256 digest) binds the session to that key:
once the key is removed (``tokenbroker consumers remove``) or loses ``admin``, the session is
refused on its next request. Sessions last :data:`SESSION_SECONDS`.

The signing key is derived from the primary encryption key (HMAC with a fixed label), so
sessions survive a restart and work across replicas sharing the config; without encryption
keys it is random per process (sessions end with the process and do not cross replicas).

CSRF: every POST from the page carries ``csrf`` (a form field) or ``X-CSRF-Token`` (a
header) equal to HMAC(signing key, "csrf" + the session's nonce): tied to the session, so a
token from another session, or none, is refused (403, nothing started).

Cookie attributes: ``HttpOnly; SameSite=Strict; Path=/`` (+ ``Secure`` when the request came
over TLS): scripts cannot read it, and no other site's page can make the browser send it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from ...core.secret import Secret
from ...engine.consumers import Consumer, ConsumerRegistry

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "SESSION_SECONDS",
    "Session",
    "SessionSigner",
]

#: The session cookie's name.
COOKIE = "tb_session"
#: The header a script sends the CSRF token in (forms send the ``csrf`` field).
CSRF_HEADER = "x-csrf-token"
#: How long a session lasts.
SESSION_SECONDS = 3600
_LABEL = b"tokenbroker status page session v1"


@dataclass(frozen=True, slots=True)
class Session:
    """A verified session: the consumer it belongs to, when it ends, and its CSRF token."""

    consumer: Consumer
    expires: float
    csrf: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Issues and verifies session cookies and CSRF tokens.

    Args:
        encryption_keys: The configured keys; the first one (the primary) derives the
            signing key. Empty: a random key for this process only.
        lifetime: Seconds a session lasts.
    """

    def __init__(
        self,
        encryption_keys: tuple[Secret, ...] = (),
        lifetime: float = SESSION_SECONDS,
    ) -> None:
        if encryption_keys:
            material = encryption_keys[0].reveal().encode("utf-8", "surrogatepass")
            self._key = hmac.new(material, _LABEL, hashlib.sha256).digest()
            self.persistent = True
        else:
            self._key = secrets.token_bytes(32)
            self.persistent = False
        self.lifetime = lifetime
        self._time = time.time

    def __repr__(self) -> str:
        return f"SessionSigner(persistent={self.persistent}, lifetime={self.lifetime:g})"

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self._key, b"\x00".join(parts), hashlib.sha256).digest()

    def _tag(self, digest: str) -> str:
        return _b64(self._mac(b"key", digest.encode()))[:22]

    def issue(self, name: str, digest: str) -> str:
        """A new session cookie value for the consumer ``name`` whose key has ``digest``."""
        body = {
            "c": name,
            "k": self._tag(digest),
            "e": int(self._time() + self.lifetime),
            "n": secrets.token_urlsafe(16),
        }
        payload = json.dumps(body, separators=(",", ":")).encode()
        return _b64(payload) + "." + _b64(self._mac(b"session", payload))

    def verify(self, cookie: str | None, registry: ConsumerRegistry) -> Session | None:
        """The session of a cookie value: None when absent, malformed, forged, expired, or
        when its key is gone or no longer has ``admin``."""
        if not cookie or len(cookie) > 1024:
            return None
        encoded, _, signature = cookie.partition(".")
        try:
            payload = _unb64(encoded)
            presented = _unb64(signature)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(presented, self._mac(b"session", payload)):
            return None
        try:
            body = json.loads(payload)
            name, tag, expires, nonce = body["c"], body["k"], body["e"], body["n"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(expires, int) or expires <= self._time():
            return None
        for digest, consumer in registry.entries():
            if consumer.name == name and hmac.compare_digest(self._tag(digest), str(tag)):
                if not consumer.is_admin():
                    return None
                return Session(consumer, float(expires), self.csrf_for(str(nonce)))
        return None

    def csrf_for(self, nonce: str) -> str:
        """The CSRF token of the session with ``nonce``."""
        return _b64(self._mac(b"csrf", nonce.encode()))

    def login_token(self, nonce: str) -> str:
        """The login form's token for the pre-login cookie ``nonce``."""
        return _b64(self._mac(b"login", nonce.encode()))

    @staticmethod
    def check(expected: str, presented: str | None) -> bool:
        """Whether ``presented`` equals ``expected`` (constant time)."""
        return presented is not None and hmac.compare_digest(
            expected.encode(), presented.encode("utf-8", "replace")
        )
