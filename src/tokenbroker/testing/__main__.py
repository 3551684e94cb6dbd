"""``python -m tokenbroker.testing``: run the bundled authorization server on its own.

For trying a configuration without the demo: it registers one confidential client,
one public client with a seeded single-use refresh token and one login account, all
with fresh random secrets, prints the server's URLs and a ready ``providers:`` block
for them, then serves until SIGINT or SIGTERM. The secrets it prints belong to this
throw-away test server and nothing else.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from tokenbroker.testing.authserver import AuthorizationServer

__all__ = ["main"]

_PROVIDERS = """\
providers:
  test-cc:
    grant: client_credentials
    token_url: {token_url}
    client_id: test-client
    client_secret: {client_secret}
    scopes: [read]
  test-rotating:
    grant: refresh_token
    token_url: {token_url}
    client_id: test-app
    refresh_token: {refresh_token}
    rotation: {{single_use: true}}
  test-login:
    grant: login
    login_url: {login_url}
    token_path: data.token
    ttl_seconds: {lifetime}
    credentials:
      - {{username: tester, password: "{password}"}}
"""


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tokenbroker.testing",
        description="Run tokenbroker's test OAuth 2.0 authorization server on 127.0.0.1.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    parser.add_argument(
        "--expires-in", type=int, default=3600, help="access-token lifetime in seconds"
    )
    parser.add_argument(
        "--rotation",
        choices=("strict", "grace", "non_rotating"),
        default="strict",
        help="refresh-token policy (default strict: single use)",
    )
    return parser.parse_args(argv)


def main(
    argv: Sequence[str] | None = None,
    *,
    out: TextIO = sys.stdout,
    stop: threading.Event | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set), printing the URLs and a config.

    Args:
        argv: Command-line arguments; default ``sys.argv[1:]``.
        out: Where the URLs and the config go.
        stop: Set it to stop serving; default a new event set by SIGINT and SIGTERM.

    Returns:
        The exit status (0).
    """
    args = _arguments(argv)
    server = AuthorizationServer(
        expires_in=args.expires_in,
        login_ttl_seconds=args.expires_in,
        rotation=args.rotation,
        host=args.host,
        port=args.port,
    )
    client_secret = secrets.token_urlsafe(24)
    password = secrets.token_urlsafe(12)
    server.add_client("test-client", client_secret, scopes=["read", "write"])
    server.add_client("test-app", None, auth_method="none")
    refresh_token = server.issue_refresh_token("test-app")
    server.add_account("tester", password)
    if stop is None:
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    with server:
        print(f"authorization server on {server.url}", file=out)
        print(f"  token endpoint:  {server.token_url}", file=out)
        print(f"  login endpoint:  {server.login_url}", file=out)
        print(f"  resource:        {server.resource_url}", file=out)
        print("providers for your tokenbroker.yaml (test secrets, this server only):", file=out)
        print(
            _PROVIDERS.format(
                token_url=server.token_url,
                login_url=server.login_url,
                client_secret=client_secret,
                refresh_token=refresh_token,
                password=password,
                lifetime=args.expires_in,
            ),
            file=out,
        )
        print("Ctrl-C to stop", file=out, flush=True)
        stop.wait()
    print("stopped", file=out, flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess
    sys.exit(main())
