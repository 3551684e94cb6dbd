"""Thread-safe record of what reached the test authorization server.

Everything is recorded when the request arrives, before faults or authlib run, so counts
include failed and faulted requests.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tokenbroker.testing.messages import Headers

__all__ = ["Recorder", "RequestRecord"]


@dataclass(frozen=True)
class RequestRecord:
    """One request as it arrived.

    Attributes:
        method: The request method.
        path: The request path.
        grant: ``grant_type`` for the token endpoint, ``"login"`` for the login endpoint,
            ``None`` otherwise.
        headers: The request headers (case-insensitive mapping; equals a plain dict).
        form: The form-encoded body fields (first value of each).
        json: The decoded JSON body, or ``None`` when the body was not JSON.
    """

    method: str
    path: str
    grant: str | None
    headers: Headers
    form: dict[str, str] = field(default_factory=dict)
    json: Any = None


class Recorder:
    """Counts and logs of requests, safe to read while the server is serving."""

    def __init__(self) -> None:
        """Start with nothing recorded."""
        self._lock = threading.Lock()
        self._grants: Counter[str] = Counter()
        self._resource = 0
        self._presented: list[str] = []
        self._requests: list[RequestRecord] = []

    def record(self, record: RequestRecord, *, resource: bool) -> None:
        """Record one arriving request.

        Args:
            record: The request.
            resource: True when it targets the protected resource.
        """
        presented = record.form.get("refresh_token") if record.grant == "refresh_token" else None
        with self._lock:
            self._requests.append(record)
            if record.grant is not None:
                self._grants[record.grant] += 1
            if resource:
                self._resource += 1
            if presented is not None:
                self._presented.append(presented)

    def count(self, grant: str) -> int:
        """Count token-endpoint or login requests for a grant.

        Args:
            grant: ``"client_credentials"``, ``"refresh_token"``, ``"login"`` or any other
                ``grant_type`` a client sent.

        Returns:
            The number seen since the last reset.
        """
        with self._lock:
            return self._grants[grant]

    def resource_count(self) -> int:
        """Count protected-resource requests.

        Returns:
            The number seen since the last reset.
        """
        with self._lock:
            return self._resource

    def reset_counts(self) -> None:
        """Zero the grant and resource counters (the logs are kept)."""
        with self._lock:
            self._grants.clear()
            self._resource = 0

    def reset(self) -> None:
        """Forget everything: counters, presented refresh tokens and request records."""
        with self._lock:
            self._grants.clear()
            self._resource = 0
            self._presented.clear()
            self._requests.clear()

    @property
    def presented_refresh_tokens(self) -> list[str]:
        """Every refresh token presented to the token endpoint, in arrival order.

        Returns:
            A copy of the list.
        """
        with self._lock:
            return list(self._presented)

    def reused_refresh_tokens(self) -> set[str]:
        """Find the refresh tokens presented more than once.

        Returns:
            The set of such tokens.
        """
        counts = Counter(self.presented_refresh_tokens)
        return {token for token, seen in counts.items() if seen > 1}

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received, in arrival order.

        Returns:
            A copy of the list.
        """
        with self._lock:
            return list(self._requests)
