"""Thread-safe record of what reached the test authorization server.

Everything is recorded when the request arrives, before faults or authlib run, so counts
include failed and faulted requests.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenbroker.testing.messages import Headers, Request

__all__ = [
    "Recorder",
    "RefreshTokenUse",
    "RequestRecord",
    "refresh_token_fingerprint",
    "request_record",
]

_REJECTED = frozenset({"reused", "revoked", "unknown"})


def refresh_token_fingerprint(value: str) -> str:
    """Name a refresh token in reports without revealing it.

    Args:
        value: The token.

    Returns:
        The first 16 hex digits of its SHA-256.
    """
    return hashlib.sha256(value.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RefreshTokenUse:
    """How often one refresh token reached the token endpoint, and what each use did.

    Attributes:
        fingerprint: :func:`refresh_token_fingerprint` of the token (never the token).
        presented: How many requests carried it, faulted and refused ones included.
        outcomes: What the server did with each presentation that reached the rotation
            policy, in order: ``accepted``, ``accepted_in_grace`` (a repeat inside the
            reuse grace, honoured by design), ``reused`` (a repeat outside it: rejected, the
            family revoked), ``revoked`` (its family was already revoked) or ``unknown``
            (never issued here).
    """

    fingerprint: str
    presented: int
    outcomes: tuple[str, ...] = ()

    @property
    def accepted_in_grace(self) -> int:
        """Presentations honoured as a repeat inside the grace window."""
        return self.outcomes.count("accepted_in_grace")

    @property
    def rejected(self) -> int:
        """Presentations refused as a reuse, a revoked family or an unknown token."""
        return sum(outcome in _REJECTED for outcome in self.outcomes)

    @property
    def unprocessed(self) -> int:
        """Presentations that never reached the rotation policy (a fault, a bad client)."""
        return self.presented - len(self.outcomes)

    def as_json(self) -> dict[str, Any]:
        """The JSON form served by the report endpoint.

        Returns:
            ``{"fingerprint", "presented", "outcomes"}``.
        """
        return {
            "fingerprint": self.fingerprint,
            "presented": self.presented,
            "outcomes": list(self.outcomes),
        }


def refresh_token_uses(
    presented: Iterable[str], outcomes: Iterable[tuple[str, str]]
) -> list[RefreshTokenUse]:
    """Join arrivals and rotation-policy outcomes per token, in order of first arrival.

    Args:
        presented: Every presented token, in arrival order.
        outcomes: ``(token, outcome)`` for each presentation the policy processed.

    Returns:
        One entry per token, named by fingerprint.
    """
    counts: dict[str, int] = {}
    for token in presented:
        counts[token] = counts.get(token, 0) + 1
    done: dict[str, list[str]] = {}
    for token, outcome in outcomes:
        done.setdefault(token, []).append(outcome)
        counts.setdefault(token, 0)
    return [
        RefreshTokenUse(
            refresh_token_fingerprint(token),
            max(count, len(done.get(token, ()))),
            tuple(done.get(token, ())),
        )
        for token, count in counts.items()
    ]


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
        query: The query parameters (every value of each), e.g. an authorization request's.
    """

    method: str
    path: str
    grant: str | None
    headers: Headers
    form: dict[str, str] = field(default_factory=dict)
    json: Any = None
    query: dict[str, list[str]] = field(default_factory=dict)


def request_record(request: Request, grant: str | None) -> RequestRecord:
    """Record a request as it arrived, its body decoded as a form or as JSON.

    Args:
        request: The request.
        grant: What it asks for (``grant_type``, ``"login"``), ``None`` for other paths.

    Returns:
        The record.
    """
    form = {} if request.is_json else request.first_form
    try:
        body = request.json() if request.is_json else None
    except ValueError:
        body = None
    query = {name: list(values) for name, values in request.query.items()}
    return RequestRecord(request.method, request.path, grant, request.headers, form, body, query)


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
