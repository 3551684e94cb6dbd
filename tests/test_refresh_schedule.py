"""Refresh-ahead counts a token's lifetime from when its request was sent (issue 17).

A fetch that waited before sending — for the store during a PostgreSQL outage, for the pool —
used to schedule the next refresh from the moment the fetch began, so the new token looked
that much older and was refreshed early: an extra token request for one expiry (seen in
`bench/cluster.py`'s PostgreSQL-restart scenario as a refresh 0.7 s after the previous one).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from support import client_credentials
from tokenbroker import Broker, parse_settings
from tokenbroker.core.clock import ManualClock
from tokenbroker.core.crypto import generate_key
from tokenbroker.testing import AuthorizationServer

WAITED = 20.0  # seconds the fetch spent before its request left (the store was down)


def test_a_fetch_that_waited_before_sending_does_not_make_the_next_refresh_early(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """The token (3,600 s, refresh-ahead at half) is sent 20 s after its fetch began: 1,790 s
    after sending nothing is due yet (it was from 1,780 s on when counted from the fetch's
    start); past 1,800 s the one refresh-ahead starts."""
    clock = ManualClock()
    config = {
        "store": f"sqlite:///{tmp_path / 'tb.db'}",
        "encryption_keys": [generate_key()],
        "defaults": {"retries": 0},
        "providers": {"svc": client_credentials(auth_server, refresh_ahead=0.5, skew_seconds=1)},
    }

    def hook(point: str) -> None:
        if point == "before_send" and auth_server.count("client_credentials") == 0:
            clock.advance(WAITED)

    broker = Broker(parse_settings(yaml.safe_dump(config), {}), clock=clock, hook=hook)
    try:
        lifetime = broker.get_token("svc").expires_at - clock.time()
        assert lifetime == 3600  # counted from the send, not from the fetch's start
        assert auth_server.count("client_credentials") == 1
        clock.advance(1790)
        assert broker.refresh_due() == 0, "refreshed early: lifetime counted from the wait"
        clock.advance(11)
        assert broker.refresh_due() == 1
    finally:
        broker.close()
