"""What a client connection needs of the proxy serving it, as a ``typing.Protocol``.

:class:`~tokenbroker.proxy.connection.ClientConnection` and its requests are typed
against :class:`ProxyHost`, not the server, so the per-request modules never import
:mod:`~tokenbroker.proxy.server` (which imports them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import ProxySettings
    from ..edge.ratelimit import RateLimits
    from ..engine.broker import Broker
    from ..engine.consumers import ConsumerRegistry
    from .connection import ClientConnection
    from .routes import Route, RouteTable

__all__ = ["ProxyHost"]


class ProxyHost(Protocol):
    """What a client connection (and its requests) needs of the proxy serving it;
    :class:`~tokenbroker.proxy.server.ProxyServer` implements it.

    Attributes:
        broker: Reads and refreshes the tokens.
        settings: The ``proxy:`` section.
        routes: Path prefixes to upstreams.
        consumers: Who may use the proxy, when a consumer key is required (else None).
        key_header: The consumer key header's lowercased name (empty: no key required).
        limits: Wrong consumer keys per client address.
        connections: The open client connections; each adds and discards itself.
        max_connections: Client connections held at once; one beyond gets 503.
        responses: Responses to clients by status.
    """

    broker: Broker
    settings: ProxySettings
    routes: RouteTable
    consumers: ConsumerRegistry | None
    key_header: frozenset[bytes]
    limits: RateLimits
    connections: set[ClientConnection]
    max_connections: int
    responses: dict[int, int]

    def count_status(self, status: int) -> None:
        """Count one response to a client by status."""

    def count_rejected(self, route: Route) -> None:
        """Count one upstream 401 that was retried with a new token."""
