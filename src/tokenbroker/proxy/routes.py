"""Routes of the proxy: a path prefix, its upstream, and where its tokens come from."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from ..config import ProxyRoute, ProxySettings
from ..core.clock import Clock
from ..core.scopes import canonical_scopes
from ..engine.broker import Broker
from .pool import TokenPool
from .upstream import UpstreamPool

__all__ = ["Route", "RouteTable"]


class Route:
    """One configured route, ready to serve.

    Attributes:
        spec: Its settings.
        prefix: The path prefix, as bytes.
        upstream: The keep-alive connection pool to its upstream.
        pool: The token pool (``mode: pool``), else None.
        host: The ``Host`` header value sent upstream.
        scope: The route's scope as configured (canonical; None for the provider's).
        scopes: The scopes its tokens are asked for, which the consumer ACL checks.
        methods: The request methods it forwards.
        allow: The ``Allow`` header value of its 405 answers.

    Args:
        spec: The route's settings.
        broker: Reads the tokens (and logs in the pool's accounts).
        settings: The ``proxy:`` section.
        clock: The token pool's time source (default: the system's).
    """

    def __init__(
        self,
        spec: ProxyRoute,
        broker: Broker,
        settings: ProxySettings,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.spec = spec
        self.provider = spec.provider
        self.scope = spec.scope
        self.scopes = canonical_scopes(
            spec.scope, getattr(broker.settings.providers[spec.provider], "scopes", ())
        )
        self.prefix = spec.prefix.encode()
        self.methods = frozenset(method.encode() for method in spec.methods)
        self.allow = ", ".join(spec.methods).encode()
        self._dir = self.prefix if self.prefix.endswith(b"/") else self.prefix + b"/"
        parts = urlsplit(spec.upstream)
        base = (parts.path or "/").encode()
        self._base = base if base.endswith(b"/") else base + b"/"
        self.host = parts.netloc.encode()
        self.request_suffix = b" HTTP/1.1\r\nhost: %b\r\n" % self.host
        tls = parts.scheme == "https"
        self.upstream = UpstreamPool(
            parts.hostname or "127.0.0.1",
            parts.port or (443 if tls else 80),
            tls=tls,
            keepalive=settings.upstream_keepalive,
            idle_seconds=settings.upstream_idle_seconds,
            connect_timeout=settings.upstream_timeout_seconds,
        )
        self.pool = (
            TokenPool(
                broker,
                spec.provider,
                wait_timeout=spec.wait_timeout_seconds,
                idle_timeout=spec.idle_timeout_seconds,
                max_lease_age=spec.max_lease_seconds,
                retry_after=settings.retry_after_seconds,
                clock=clock,
            )
            if spec.mode == "pool"
            else None
        )

    def matches(self, path: bytes) -> bool:
        """Whether ``path`` is under this route's prefix."""
        return path.startswith(self._dir) or path == self._dir[:-1] or self.prefix == b"/"

    def target(self, path: bytes) -> bytes:
        """The upstream request path for ``path`` (prefix replaced by the upstream's path)."""
        rest = path[len(self._dir) :] if path.startswith(self._dir) else b""
        return self._base + rest

    def __repr__(self) -> str:
        return (
            f"<Route prefix={self.spec.prefix!r} upstream={self.spec.upstream!r} "
            f"provider={self.provider!r} mode={self.spec.mode}>"
        )


class RouteTable:
    """Routes by longest matching prefix."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)

    def match(self, path: bytes) -> Route | None:
        """The route with the longest prefix ``path`` is under, or None."""
        for route in self.routes:
            if route.matches(path):
                return route
        return None
