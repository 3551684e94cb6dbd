"""The memory backend's consumers (:class:`~.base.ConsumerStore`) and delegation signing
keys (:class:`~.base.SigningKeyStore`), under the memory store's one lock.

Consumers are kept as digests, never keys; every add or remove gives ``tb_meta``'s
``consumers_version`` a new random value. Signing keys are sealed by :mod:`.sealing`
exactly as on disk.
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any

from ..errors import StoreError
from .sealing import Sealer

__all__ = ["MemoryConsumers"]


class MemoryConsumers:
    """The consumer and signing-key half of :class:`~.memory.MemoryStore` (a mixin: the
    store provides ``_lock``, ``_tables``, ``_sealer`` and ``now``)."""

    _lock: threading.RLock
    _tables: dict[str, dict[Any, dict[str, Any]]]
    _sealer: Sealer

    def now(self) -> float:  # pragma: no cover - provided by the store
        raise NotImplementedError

    def add_consumer(self, name: str, key_sha256: str, allow: list[str]) -> None:
        """Store a consumer (see :class:`~.base.ConsumerStore`).

        Raises:
            StoreError: When the name or key digest exists already.
        """
        with self._lock:
            consumers = self._tables["tb_consumer"]
            if name in consumers or any(c["key_sha256"] == key_sha256 for c in consumers.values()):
                raise StoreError(f"a consumer named {name!r} exists already")
            consumers[name] = {
                "name": name,
                "key_sha256": key_sha256,
                "allow": json.dumps(allow),
                "created_at": self.now(),
            }
            self._consumers_changed()

    def remove_consumer(self, name: str) -> bool:
        """Delete a stored consumer.

        Returns:
            Whether it existed.
        """
        with self._lock:
            if self._tables["tb_consumer"].pop(name, None) is None:
                return False
            self._consumers_changed()
            return True

    def consumers_version(self) -> str:
        """A value that changes whenever a stored consumer is added or removed."""
        with self._lock:
            row = self._tables["tb_meta"].get("consumers_version")
            return str(row["value"]) if row else ""

    def consumers(self) -> list[tuple[str, str, list[str]]]:
        """Every stored consumer as ``(name, key digest, allow rules)``."""
        with self._lock:
            rows = sorted(self._tables["tb_consumer"].values(), key=lambda c: str(c["name"]))
            return [(c["name"], c["key_sha256"], list(json.loads(c["allow"]))) for c in rows]

    def signing_keys(self, algorithm: str) -> list[tuple[str, bytes]]:
        """The delegation signing keys for ``algorithm`` as ``(kid, private PEM)``, newest first."""
        with self._lock:
            rows = [
                k for k in self._tables["tb_signing_key"].values() if k["algorithm"] == algorithm
            ]
        rows.sort(key=lambda k: str(k["kid"]))
        rows.sort(key=lambda k: float(k["created_at"]), reverse=True)
        return [
            (k["kid"], self._sealer.open(k["private_ct"], "tb_signing_key", k["kid"], "private"))
            for k in rows
        ]

    def add_signing_key(self, kid: str, algorithm: str, private_pem: bytes) -> None:
        """Store a delegation signing key, sealed; a no-op if ``kid`` exists."""
        blob = self._sealer.seal(private_pem, "tb_signing_key", kid, "private")
        with self._lock:
            self._tables["tb_signing_key"].setdefault(
                kid,
                {"kid": kid, "algorithm": algorithm, "private_ct": blob, "created_at": self.now()},
            )

    def _consumers_changed(self) -> None:
        """Random, not a counter: equal values mean the same consumers."""
        self._tables["tb_meta"]["consumers_version"] = {"value": secrets.token_hex(16)}
