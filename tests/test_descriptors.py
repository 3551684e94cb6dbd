"""The descriptor budget splits RLIMIT_NOFILE between the proxy, the API and a reserve."""

from __future__ import annotations

import resource

import pytest

from tokenbroker.edge.descriptors import MIN_RESERVE, budget


@pytest.mark.parametrize("limit", [16, 256, 1024, 65_536])
def test_proxy_and_api_never_spend_the_reserve(limit: int) -> None:
    """Two descriptors per proxy client plus the API's share stay under the limit, leaving at
    least a quarter of the API's share (and 1 each) for everything else."""
    share = budget(with_proxy=True, limit=limit)
    assert share.proxy_clients >= 1 and share.api_connections >= 1
    assert share.reserve >= MIN_RESERVE
    if limit > 2 * MIN_RESERVE:
        assert 2 * share.proxy_clients + share.api_connections <= limit - share.reserve // 2


def test_under_ulimit_1024_the_proxy_holds_384_clients_and_the_api_128() -> None:
    """The common `ulimit -n 1024` gives 384 proxy clients and 128 API connections; without a
    proxy the API may hold all but MIN_RESERVE."""
    assert budget(with_proxy=True, limit=1024)[1:] == (256, 384, 128)
    assert budget(with_proxy=False, limit=1024).api_connections == 1024 - MIN_RESERVE


def test_the_default_is_this_process_limit() -> None:
    """Without a limit given, the budget follows this process's soft RLIMIT_NOFILE."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    expected = 1 << 20 if soft == resource.RLIM_INFINITY or soft > 1 << 20 else soft
    assert budget(with_proxy=True).limit == expected
