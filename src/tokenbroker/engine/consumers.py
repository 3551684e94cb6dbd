"""Consumers: who may ask the broker for which provider and scopes.

An API key is ``tbk_`` + 43 URL-safe characters (256 random bits). Only its
SHA-256 is kept — in the config (``consumers: {name: {api_key_sha256, allow}}``)
or in the store (``tokenbroker consumers add``). Authentication hashes the
presented key and looks the digest up; the digest, not the key, is what is
compared, with :func:`hmac.compare_digest`, so timing reveals nothing useful.

An ``allow`` rule is ``provider`` (any scope) or ``provider:scope1 scope2`` (those
scopes only; a request's scopes must be a subset). The scopes checked are the request's
canonical ones (:func:`tokenbroker.core.scopes.canonical_scopes`: absent or blank means the
provider's configured scopes; case-sensitive), the very set the token request asks for.

Delegated tokens need their own rules: ``delegate:provider`` (tokens whose subject is the
consumer's own) and ``delegate-as:provider`` (also tokens for any other subject the consumer
names). A token rule alone does not allow delegation, nor a delegation rule token reads; so
``delegate`` and ``delegate-as`` are not provider names. The word ``jobs`` allows the jobs
API (:meth:`Consumer.may_run_jobs`), for the jobs of the providers its token rules name
(:meth:`Consumer.uses`); the word ``admin`` allows the status page and the event stream
(:meth:`Consumer.is_admin`); neither is a provider name. A consumer's subject is
its configured ``subject``, else its name; a stored consumer keeps it as the
``subject=NAME`` entry of its allow list (:func:`subject_entry`), so the store needs no
column for it.

A registry built with :meth:`ConsumerRegistry.load` follows the store: a running server
checks :meth:`~tokenbroker.store.ConsumerStore.consumers_version` every
:data:`FOLLOW_SECONDS` (off the event loop) and swaps in the new set when it changed, so
``tokenbroker consumers add`` and ``remove`` take effect without a restart. With a
:class:`~tokenbroker.engine.coordination.Coordinator` (cluster mode: Redis), a "consumers
changed" notice wakes the follower at once; the check every :data:`FOLLOW_SECONDS` stays as
the fallback for notices lost or Redis down. Authentication itself stays a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..core.rules import DELEGATE_AS, Rule, check_subject, parse_allow, parse_rule
from ..errors import ForbiddenSubjectError
from .coordination import CONSUMERS, Coordinator, Watch

if TYPE_CHECKING:
    from ..config import ConsumerSettings

__all__ = [
    "FOLLOW_SECONDS",
    "Consumer",
    "ConsumerRegistry",
    "ConsumerSource",
    "hash_key",
    "new_key",
]

logger = logging.getLogger("tokenbroker.consumers")

#: How often a registry that follows the store checks it for added and removed consumers.
FOLLOW_SECONDS = 0.5

KEY_PREFIX = "tbk_"
_KEY = re.compile(r"tbk_[A-Za-z0-9_-]{43}\Z")


def new_key() -> str:
    """A new API key (256 random bits); show it once, store only :func:`hash_key` of it."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Consumer:
    """An authenticated caller of the broker.

    Attributes:
        name: The consumer's name (for logs and audit; not a secret).
        rules: What it may ask for.
        subject: Its configured subject for delegated tokens; None: its name.
    """

    name: str
    rules: tuple[Rule, ...]
    subject: str | None = None

    def allows(self, provider: str, scopes: Iterable[str] = ()) -> bool:
        """Whether this consumer may get ``provider`` tokens with ``scopes``.

        Args:
            provider: The provider name.
            scopes: The canonical scopes the token will be asked for. Empty means no scope
                restriction at all (the provider's own default, often every scope), which
                only a rule without scopes covers.

        Returns:
            True if some token rule covers the request (delegation rules never do).
        """
        wanted = frozenset(scopes)
        for rule in self.rules:
            if rule.provider != provider or rule.action != "token":
                continue
            if rule.scopes is None or (wanted and wanted <= rule.scopes):
                return True
        return False

    def may_delegate(self, provider: str) -> bool:
        """Whether a ``delegate:`` or ``delegate-as:`` rule names ``provider``."""
        return any(r.provider == provider and r.action != "token" for r in self.rules)

    def delegation_subject(self, provider: str, requested: str | None = None) -> str:
        """The subject of a delegated token this consumer asks for (call after
        :meth:`may_delegate`).

        Args:
            provider: The provider name.
            requested: The subject the request names; None: the consumer's own.

        Returns:
            ``requested`` when given and allowed, else the consumer's subject (or name).

        Raises:
            InvalidDelegationError: ``requested`` is malformed.
            ForbiddenSubjectError: ``requested`` is not the consumer's own subject and no
                ``delegate-as:provider`` rule allows naming another.
        """
        own = self.subject or self.name
        if requested is None or requested == own:
            return own
        check_subject(requested)
        if any(r.provider == provider and r.action == DELEGATE_AS for r in self.rules):
            return requested
        raise ForbiddenSubjectError("this consumer may delegate only for its own subject")

    def may_run_jobs(self) -> bool:
        """Whether the ``jobs`` rule is in the allow list."""
        return any(r.action == "jobs" for r in self.rules)

    def is_admin(self) -> bool:
        """Whether the ``admin`` rule is in the allow list (the status page, ``/v1/events``)."""
        return any(r.action == "admin" for r in self.rules)

    def uses(self, provider: str) -> bool:
        """Whether some token rule names ``provider`` (with any scopes): what a job of that
        provider needs besides :meth:`may_run_jobs`."""
        return any(r.provider == provider and r.action == "token" for r in self.rules)

    def providers(self) -> list[str]:
        """The providers any rule mentions, sorted."""
        return sorted({rule.provider for rule in self.rules if rule.provider})


class ConsumerSource(Protocol):
    """Where stored consumers come from (every :class:`~tokenbroker.store.ConsumerStore` is one)."""

    def consumers_version(self) -> str:
        """A value that changes whenever the stored consumers change."""
        ...  # pragma: no cover

    def consumers(self) -> list[tuple[str, str, list[str]]]:
        """Every stored consumer as ``(name, key digest, allow entries)`` (rules, and at most
        one ``subject=NAME``)."""
        ...  # pragma: no cover


class ConsumerRegistry:
    """Consumers by key digest: fixed ones (the config) plus, when it has a source, the stored
    ones as of the last :meth:`reload`.

    Args:
        consumers: ``(name, key digest, rules)`` or ``(name, key digest, rules, subject)``
            entries that never change.
        source: Where stored consumers are re-read from (see :meth:`follow`); None: none.
        coordinator: Wakes :meth:`follow` when another process changed the stored consumers.

    Raises:
        StoreError: ``source`` fails on the first read.
    """

    def __init__(
        self,
        consumers: Iterable[
            tuple[str, str, Iterable[Rule]] | tuple[str, str, Iterable[Rule], str | None]
        ] = (),
        *,
        source: ConsumerSource | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.coordinator = coordinator
        self._fixed: dict[str, Consumer] = {}
        for name, digest, rules, *subject in consumers:
            self._fixed[digest] = Consumer(name, tuple(rules), subject[0] if subject else None)
        self._by_digest = dict(self._fixed)
        self._source = source
        self._version: str | None = None
        self._reloading = threading.Lock()
        self.reload()

    @classmethod
    def from_settings(cls, consumers: Mapping[str, ConsumerSettings]) -> ConsumerRegistry:
        """Build from the ``consumers:`` config section (validated by :mod:`tokenbroker.config`)."""
        return cls(_configured(consumers))

    def __repr__(self) -> str:
        return f"ConsumerRegistry(consumers={len(self._by_digest)})"

    def __len__(self) -> int:
        return len(self._by_digest)

    def add(
        self, name: str, digest: str, rules: Iterable[Rule], subject: str | None = None
    ) -> None:
        """Register a consumer that stays until the process ends (a :meth:`reload` keeps it)."""
        consumer = Consumer(name, tuple(rules), subject)
        with self._reloading:
            self._fixed[digest] = consumer
            self._by_digest = {**self._by_digest, digest: consumer}

    @classmethod
    def load(
        cls,
        settings: Mapping[str, ConsumerSettings],
        source: ConsumerSource,
        coordinator: Coordinator | None = None,
    ) -> ConsumerRegistry:
        """Consumers from the config section plus those stored by ``tokenbroker consumers add``,
        re-read from ``source`` by :meth:`reload` (run :meth:`follow` while serving), at once
        on a ``coordinator`` notice.

        Raises:
            StoreError: When the stored consumers cannot be read.
        """
        return cls(_configured(settings), source=source, coordinator=coordinator)

    def reload(self) -> bool:
        """Re-read the stored consumers if the source says they changed. A stored consumer
        with a malformed rule or subject entry is left out (and logged by name).

        Returns:
            Whether the stored consumers were re-read.

        Raises:
            StoreError: The source failed; the consumers already loaded stay in force.
        """
        source = self._source
        if source is None:
            return False
        with self._reloading:
            version = source.consumers_version()  # before the rows: a later change is seen next
            if version == self._version:
                return False
            by_digest = dict(self._fixed)
            for name, digest, texts in source.consumers():
                try:
                    rules, subject = parse_allow(texts)
                except ValueError:
                    logger.warning("stored consumer %s has a malformed allow rule; refused", name)
                    continue
                by_digest[digest] = Consumer(name, rules, subject)
            self._by_digest = by_digest  # one reference swap: readers see old or new, whole
            self._version = version
            return True

    async def follow(self, every: float = FOLLOW_SECONDS) -> None:
        """Keep in step with the source until cancelled: :meth:`reload` every ``every``
        seconds, and at once on a coordinator's "consumers changed" notice, in a worker thread,
        never on the event loop. A failing source is logged once (by error class) and
        retried; the consumers already loaded stay in force meanwhile.

        Args:
            every: Seconds between checks (with a coordinator: the longest wait for a notice).
        """
        if self._source is None:
            return
        if self.coordinator is None:
            await self._follow(every, None)
            return
        with self.coordinator.watch(CONSUMERS) as watch:
            try:
                await self._follow(every, watch)
            finally:
                watch.notify()  # frees the worker thread still waiting on it

    async def _follow(self, every: float, watch: Watch | None) -> None:
        failing = False
        while True:
            if watch is None:
                await asyncio.sleep(every)
            else:
                await asyncio.to_thread(watch.wait, every)
            try:
                await asyncio.to_thread(self.reload)
            except Exception as exc:
                if not failing:
                    logger.warning("cannot re-read stored consumers: %s", type(exc).__name__)
                failing = True
            else:
                if failing:
                    logger.info("stored consumers are read again")
                failing = False

    def entries(self) -> list[tuple[str, Consumer]]:
        """Every consumer with its key digest, as of now (for sessions bound to a key)."""
        return list(self._by_digest.items())

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


def _configured(
    consumers: Mapping[str, ConsumerSettings],
) -> list[tuple[str, str, list[Rule], str | None]]:
    """The ``consumers:`` config section (validated by :mod:`tokenbroker.config`) as
    ``(name, digest, rules, subject)``."""
    return [
        (name, spec.api_key_sha256, [parse_rule(rule) for rule in spec.allow], spec.subject)
        for name, spec in consumers.items()
    ]
