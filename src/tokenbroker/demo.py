"""``tokenbroker dev``: a complete local demo on this machine.

Starts the bundled authorization server (:mod:`tokenbroker.testing`) on
127.0.0.1, an embedded broker on a SQLite store in a temporary folder (with a
generated encryption key) configured for it (client credentials, a
single-use rotating refresh token, and two username/password logins), prints
a token per provider and calls the protected demo resource with each, then
prints one line per background refresh — with the remaining lifetime, never
the token — until interrupted or ``duration`` runs out.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from .broker import Broker
from .config import parse_settings
from .crypto import generate_key
from .events import Event, TokenAcquired, TokenRequestFailed
from .testing import AuthorizationServer

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG = """
store: sqlite:///${STORE_PATH}
encryption_keys: ["${DEMO_KEY}"]
defaults:
  skew_seconds: 2
  refresh_ahead: 0.7
  retries: 2
providers:
  demo-api:
    grant: client_credentials
    token_url: ${TOKEN_URL}
    client_id: demo-client
    client_secret: ${DEMO_CLIENT_SECRET}
    scopes: [read]
  demo-rotating:
    grant: refresh_token
    token_url: ${TOKEN_URL}
    client_id: demo-app
    refresh_token: ${DEMO_REFRESH_TOKEN}
    rotation: {single_use: true}
  demo-db:
    grant: login
    login_url: ${LOGIN_URL}
    token_path: data.token
    ttl_seconds: ${LIFETIME}
    credentials:
      - {username: alice, password: "${ALICE_PASSWORD}"}
      - {username: bob, password: "${BOB_PASSWORD}"}
"""


def run_demo(
    *,
    duration: float | None = None,
    lifetime: int = 20,
    echo: Callable[[str], None] = print,
) -> int:
    """Run the demo.

    Args:
        duration: Seconds to keep refreshing before returning; None = until KeyboardInterrupt.
        lifetime: Lifetime of the demo tokens, so refreshes happen while you watch.
        echo: Where output lines go.

    Returns:
        The number of background refreshes seen.
    """
    server = AuthorizationServer(expires_in=lifetime, login_ttl_seconds=lifetime, rotation="strict")
    server.add_client(
        "demo-client", "demo-secret", auth_method="client_secret_basic", scopes=["read"]
    )
    server.add_client("demo-app", None, auth_method="none")
    seed = server.issue_refresh_token("demo-app")
    server.add_account("alice", "alice-password")
    server.add_account("bob", "bob-password")
    refreshes = 0
    lock = threading.Lock()
    with server, tempfile.TemporaryDirectory(prefix="tokenbroker-dev-") as folder:
        env = {
            "STORE_PATH": str(Path(folder) / "tokenbroker.db"),
            "DEMO_KEY": generate_key(),
            "TOKEN_URL": server.token_url,
            "LOGIN_URL": server.login_url,
            "DEMO_CLIENT_SECRET": "demo-secret",
            "DEMO_REFRESH_TOKEN": seed,
            "ALICE_PASSWORD": "alice-password",
            "BOB_PASSWORD": "bob-password",
            "LIFETIME": str(lifetime),
        }
        settings = parse_settings(DEMO_CONFIG, env)
        with Broker(settings) as broker:

            def on_event(event: Event) -> None:
                nonlocal refreshes
                stamp = time.strftime("%H:%M:%S")
                if isinstance(event, TokenAcquired) and event.background:
                    with lock:
                        refreshes += 1
                    echo(
                        f"[{stamp}] refreshed {_label(event)} in "
                        f"{event.duration * 1000:.1f} ms; valid for {event.expires_in:.0f} s"
                    )
                elif isinstance(event, TokenRequestFailed):
                    echo(f"[{stamp}] refresh of {_label(event)} failed: {event.code}")

            broker.subscribe(on_event)
            echo(f"tokenbroker dev: authorization server on {server.url}")
            echo(f"store: {env['STORE_PATH']} (secrets encrypted with a generated key)")
            for provider in sorted(settings.providers):
                accounts: list[str | None] = [*broker.accounts(provider)] or [None]
                for account in accounts:
                    token = broker.get_token(provider, account=account)
                    who = f" ({account})" if account else ""
                    status = httpx.get(
                        server.resource_url, auth=broker.httpx_auth(provider, account=account)
                    ).status_code
                    echo(
                        f"{provider}{who}: {token.token_type} {token.access_token} "
                        f"(expires in {token.expires_in} s; demo resource says {status})"
                    )
            echo("watching background refreshes (Ctrl-C to stop)")
            stop_at = None if duration is None else time.monotonic() + duration
            while stop_at is None or time.monotonic() < stop_at:
                broker.refresh_due()
                time.sleep(0.25)
    return refreshes


def _label(event: Event) -> str:
    return f"{event.provider} ({event.key})" if event.key else event.provider
