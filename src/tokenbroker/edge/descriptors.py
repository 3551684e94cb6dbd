"""The file-descriptor budget: how many client connections the proxy and the API may hold.

A process may open ``RLIMIT_NOFILE`` descriptors (often 1,024). Every client connection
takes one, and a proxied one may take a second for its upstream connection. Without a
cap, idle keep-alive clients use them all up, and then nothing can be accepted any more:
not an API call, not a health probe, not the store's file. So a reserve is kept back
from the proxy for the rest of the process (listeners, the store, logins, logs, the
health port), and half of that reserve is what the API may hold at once.
"""

from __future__ import annotations

import resource
from typing import NamedTuple

__all__ = ["DescriptorBudget", "budget"]

MIN_RESERVE = 64
# Kept below RLIM_INFINITY's absurd values: the cap is a count we compare with, not memory.
_UNLIMITED = 1 << 20


class DescriptorBudget(NamedTuple):
    """What a process with ``limit`` descriptors gives each listener.

    Attributes:
        limit: The soft ``RLIMIT_NOFILE`` it was derived from.
        reserve: Descriptors the proxy leaves to the rest of the process.
        proxy_clients: Client connections the proxy holds at once (each may need an
            upstream connection too, so half of what is left after the reserve).
        api_connections: Connections the API serves at once (uvicorn's
            ``limit_concurrency``): half the reserve when the proxy shares the process,
            else all but :data:`MIN_RESERVE`.
    """

    limit: int
    reserve: int
    proxy_clients: int
    api_connections: int


def budget(*, with_proxy: bool, limit: int | None = None) -> DescriptorBudget:
    """Split the descriptor limit between the proxy, the API and a reserve.

    Args:
        with_proxy: The proxy runs in this process.
        limit: The descriptor limit; default: this process's soft ``RLIMIT_NOFILE``.

    Returns:
        The budget (every share at least 1).
    """
    if limit is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = _UNLIMITED if soft == resource.RLIM_INFINITY or soft > _UNLIMITED else soft
    reserve = max(MIN_RESERVE, limit // 4)
    proxy_clients = max(1, (limit - reserve) // 2)
    api = reserve // 2 if with_proxy else limit - MIN_RESERVE
    return DescriptorBudget(limit, reserve, proxy_clients, max(1, api))
