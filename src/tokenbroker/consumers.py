"""Consumers: who may ask the broker for which provider and scopes.

An API key is ``tbk_`` + 43 URL-safe characters (256 random bits). Only its
SHA-256 is kept — in the config (``consumers: {name: {api_key_sha256, allow}}``)
or in the store (``tokenbroker consumers add``). Authentication hashes the
presented key and looks the digest up; the digest, not the key, is what is
compared, with :func:`hmac.compare_digest`, so timing reveals nothing useful.

An ``allow`` rule is ``provider`` (any scope) or ``provider:scope1 scope2`` (those
scopes only; a request's scopes must be a subset). The scopes checked are the request's
canonical ones (:func:`tokenbroker.scopes.canonical_scopes`: absent or blank means the
provider's configured scopes; case-sensitive), the very set the token request asks for.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ConsumerSettings

__all__ = ["Consumer", "ConsumerRegistry", "hash_key", "new_key", "parse_rule"]

KEY_PREFIX = "tbk_"
_KEY = re.compile(r"tbk_[A-Za-z0-9_-]{43}\Z")
_RULE = re.compile(r"([a-z0-9][a-z0-9_-]{0,63})(?::([\x21\x23-\x5b\x5d-\x7e ]+))?\Z")


def new_key() -> str:
    """A new API key (256 random bits); show it once, store only :func:`hash_key` of it."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``allow`` entry.

    Attributes:
        provider: The provider name.
        scopes: Allowed scopes, or None for any scope.
    """

    provider: str
    scopes: frozenset[str] | None

    def __str__(self) -> str:
        return (
            self.provider
            if self.scopes is None
            else f"{self.provider}:{' '.join(sorted(self.scopes))}"
        )


def parse_rule(text: str) -> Rule:
    """Parse ``provider`` or ``provider:scope1 scope2``.

    Raises:
        ValueError: For a malformed rule.
    """
    match = _RULE.match(text.strip())
    if not match:
        raise ValueError("an allow rule is PROVIDER or PROVIDER:SCOPE[ SCOPE...]")
    provider, scopes = match.group(1), match.group(2)
    return Rule(provider, None if scopes is None else frozenset(scopes.split()))


@dataclass(frozen=True, slots=True)
class Consumer:
    """An authenticated caller of the broker.

    Attributes:
        name: The consumer's name (for logs and audit; not a secret).
        rules: What it may ask for.
    """

    name: str
    rules: tuple[Rule, ...]

    def allows(self, provider: str, scopes: Iterable[str] = ()) -> bool:
        """Whether this consumer may get ``provider`` tokens with ``scopes``.

        Args:
            provider: The provider name.
            scopes: The canonical scopes the token will be asked for. Empty means no scope
                restriction at all (the provider's own default, often every scope), which
                only a rule without scopes covers.

        Returns:
            True if some rule covers the request.
        """
        wanted = frozenset(scopes)
        for rule in self.rules:
            if rule.provider != provider:
                continue
            if rule.scopes is None or (wanted and wanted <= rule.scopes):
                return True
        return False

    def providers(self) -> list[str]:
        """The providers any rule mentions, sorted."""
        return sorted({rule.provider for rule in self.rules})


class ConsumerRegistry:
    """Consumers by key digest.

    Args:
        consumers: ``(name, key digest, rules)`` triples.
    """

    def __init__(self, consumers: Iterable[tuple[str, str, Iterable[Rule]]] = ()) -> None:
        self._by_digest: dict[str, Consumer] = {}
        for name, digest, rules in consumers:
            self._by_digest[digest] = Consumer(name, tuple(rules))

    @classmethod
    def from_settings(cls, consumers: Mapping[str, ConsumerSettings]) -> ConsumerRegistry:
        """Build from the ``consumers:`` config section (validated by :mod:`tokenbroker.config`)."""
        return cls(
            (name, spec.api_key_sha256, [parse_rule(rule) for rule in spec.allow])
            for name, spec in consumers.items()
        )

    def __repr__(self) -> str:
        return f"ConsumerRegistry(consumers={len(self._by_digest)})"

    def __len__(self) -> int:
        return len(self._by_digest)

    def add(self, name: str, digest: str, rules: Iterable[Rule]) -> None:
        """Register a consumer (e.g. one loaded from the store)."""
        self._by_digest[digest] = Consumer(name, tuple(rules))

    @classmethod
    def load(
        cls, settings: Mapping[str, ConsumerSettings], stored: Iterable[tuple[str, str, list[str]]]
    ) -> ConsumerRegistry:
        """Consumers from the config section plus those stored by ``tokenbroker consumers add``."""
        registry = cls.from_settings(settings)
        for name, digest, rules in stored:
            registry.add(name, digest, [parse_rule(rule) for rule in rules])
        return registry

    def authenticate(self, key: str | None) -> Consumer | None:
        """The consumer whose key this is, or None.

        The same digest work is done for malformed and unknown keys.
        """
        digest = hash_key(key or "")
        consumer = self._by_digest.get(digest)
        if consumer is None or key is None or not _KEY.match(key):
            hmac.compare_digest(digest, digest)
            return None
        return consumer if hmac.compare_digest(digest, hash_key(key)) else None
