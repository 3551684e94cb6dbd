"""``tokenbroker dev``: a complete local demo on this machine.

Starts, all on 127.0.0.1: the bundled authorization server
(:mod:`tokenbroker.testing`), a demo upstream API that only answers with a valid
token, and the broker's HTTP API on an encrypted SQLite store in a temporary
folder (generated key) with three providers — client credentials (which also
mints delegated download tokens), a single-use rotating refresh token, and two
username/password logins, which the token proxy pools in front of the upstream.
It creates a consumer key, prints curl lines that work as pasted, checks them
itself, runs a ``warm`` job of the login pool printing its progress lines (the demo
consumer has the ``jobs`` permission), starts an ``authorize`` job of the refresh-token
provider and prints its URL (sign in as alice; the bundled server's login and consent pages
lead back to the broker's ``/v1/oauth/callback``), then prints one line per background refresh —
with the remaining lifetime, never the token — until interrupted.
"""

from __future__ import annotations

import hashlib
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ..api.app import create_app
from ..api.connection import BoundedHeadProtocol
from ..config import parse_settings
from ..core.crypto import generate_key
from ..core.events import Event, TokenAcquired, TokenRequestFailed
from ..engine.broker import Broker
from ..engine.consumers import hash_key, new_key
from ..jobs.service import JobService
from ..testing import AuthorizationServer
from ..testing.asgi import ServedApp
from ..testing.served_proxy import ServedProxy
from ..testing.upstream import demo_upstream
from .jobs import _local_events
from .progress import PlainRenderer

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
    delegation: {mode: jwt, audiences: [demo-downloads], max_lifetime_seconds: 300}
  demo-rotating:
    grant: refresh_token
    token_url: ${TOKEN_URL}
    client_id: demo-app
    refresh_token: ${DEMO_REFRESH_TOKEN}
    rotation: {single_use: true}
    authorization:
      issuer: ${ISSUER}
      redirect_uri: ${CALLBACK_URL}
      scopes: [offline_access]
      params: {prompt: consent}
  demo-db:
    grant: login
    login_url: ${LOGIN_URL}
    token_path: data.token
    ttl_seconds: ${LIFETIME}
    credentials:
      - {username: alice, password: "${ALICE_PASSWORD}"}
      - {username: bob, password: "${BOB_PASSWORD}"}
redirects:
  downloads: {provider: demo-api, audience: demo-downloads, url: "${DOWNLOAD_URL}"}
proxy:
  listen: ${PROXY_LISTEN}
  routes:
    - {prefix: /, upstream: "${UPSTREAM_URL}", provider: demo-db, mode: pool}
"""

AUDIENCE = "demo-downloads"


def _port(preferred: int) -> int:
    """``preferred`` if it is free on 127.0.0.1, else any free port."""
    for candidate in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port: int = sock.getsockname()[1]
            return port
    raise OSError("no free port")  # pragma: no cover


def run_demo(
    *,
    duration: float | None = None,
    lifetime: int = 20,
    port: int = 8750,
    echo: Callable[[str], None] = print,
) -> int:
    """Run the demo.

    Args:
        duration: Seconds to keep refreshing before returning; None = until KeyboardInterrupt.
        lifetime: Lifetime of the demo tokens, so refreshes happen while you watch.
        port: The broker API's port if free (default 8750, DESIGN §3.1).
        echo: Where output lines go.

    Returns:
        The number of background refreshes seen.
    """
    idp = AuthorizationServer(expires_in=lifetime, login_ttl_seconds=lifetime, rotation="strict")
    idp.add_client("demo-client", "demo-secret", auth_method="client_secret_basic", scopes=["read"])
    api_url = f"http://127.0.0.1:{_port(port)}"
    idp.add_client(
        "demo-app",
        None,
        auth_method="none",
        scopes=["offline_access"],
        redirect_uris=[f"{api_url}/v1/oauth/callback"],
    )
    seed = idp.issue_refresh_token("demo-app")
    idp.add_account("alice", "alice-password")
    idp.add_account("bob", "bob-password")
    refreshes = 0
    lock = threading.Lock()
    upstream = ServedApp(demo_upstream(idp, f"{api_url}/.well-known/jwks.json", AUDIENCE))
    with idp, upstream, tempfile.TemporaryDirectory(prefix="tokenbroker-dev-") as folder:
        env = {
            "STORE_PATH": str(Path(folder) / "tokenbroker.db"),
            "DEMO_KEY": generate_key(),
            "TOKEN_URL": idp.token_url,
            "ISSUER": idp.issuer,
            "CALLBACK_URL": f"{api_url}/v1/oauth/callback",
            "LOGIN_URL": idp.login_url,
            "DEMO_CLIENT_SECRET": "demo-secret",
            "DEMO_REFRESH_TOKEN": seed,
            "ALICE_PASSWORD": "alice-password",
            "BOB_PASSWORD": "bob-password",
            "LIFETIME": str(lifetime),
            "DOWNLOAD_URL": f"{upstream.url}/download",
            "UPSTREAM_URL": upstream.url,
            "PROXY_LISTEN": f"127.0.0.1:{_port(8080)}",
        }
        settings = parse_settings(DEMO_CONFIG, env)
        with Broker(settings) as broker:
            key = new_key()
            delegating = [
                f"delegate:{name}"
                for name, provider in sorted(settings.providers.items())
                if provider.delegation is not None
            ]
            broker.store.add_consumer(
                "demo", hash_key(key), [*sorted(settings.providers), *delegating, "jobs", "admin"]
            )
            jobs = JobService(broker)

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
            assert settings.proxy is not None
            app = create_app(broker, job_service=jobs)
            with (
                ServedApp(
                    app,
                    port=int(api_url.rsplit(":", 1)[1]),
                    http=BoundedHeadProtocol,
                    lifespan="on",
                ),
                ServedProxy(broker, settings.proxy) as proxy,
            ):
                app.state.status.pools = proxy.server  # the status page shows its pool
                _introduce(echo, idp, upstream.url, api_url, env["STORE_PATH"], key, proxy)
                _show_tokens(echo, broker, idp)
                _check_curl_lines(echo, api_url, upstream.url, key, proxy)
                jobs.start_background()
                try:
                    _warm_pool(echo, jobs)
                    _offer_authorization(echo, jobs, api_url)
                    echo("watching background refreshes (Ctrl-C to stop)")
                    stop_at = None if duration is None else time.monotonic() + duration
                    while stop_at is None or time.monotonic() < stop_at:
                        broker.refresh_due()
                        time.sleep(0.25)
                finally:
                    jobs.stop_background()
    return refreshes


def _warm_pool(echo: Callable[[str], None], jobs: JobService) -> None:
    """Start a warm job of the demo pool and print its progress lines until it ends."""
    job, _ = jobs.start("warm", {"provider": "demo-db"}, "demo")
    echo(f"warm job {job.job_id} of demo-db:")
    renderer = PlainRenderer(lambda line: echo(f"  {line}"), 10)
    try:
        for event in _local_events(jobs, job.job_id):
            renderer.show(event)
    finally:
        renderer.close()


def _offer_authorization(echo: Callable[[str], None], jobs: JobService, api: str) -> None:
    """Start an ``authorize`` job of the demo refresh-token provider and print its URL."""
    job, _ = jobs.start("authorize", {"provider": "demo-rotating"}, "demo")
    row = jobs.store.job(job.job_id)
    url = None if row is None else jobs.authorizations.authorize_url(row)
    echo("re-authorise demo-rotating (sign in as alice / alice-password, then consent):")
    echo(f"  authorize URL  {url}")
    echo(f"  or: tokenbroker authorize demo-rotating --url {api} --key $TB_KEY")
    echo("")


def _introduce(
    echo: Callable[[str], None],
    idp: AuthorizationServer,
    upstream: str,
    api: str,
    store: str,
    key: str,
    proxy: ServedProxy,
) -> None:
    echo("tokenbroker dev")
    echo(f"  authorization server  {idp.url}")
    echo(f"  demo upstream         {upstream}  (GET /api/data needs a valid token)")
    echo(f"  broker API            {api}  (store {store}, encrypted with a generated key)")
    echo(f"  token proxy           {proxy.url}  (pool of alice and bob, one per connection)")
    echo(f"  proxy health          {proxy.health_url}")
    echo(f"  consumer key          {key}")
    echo(f"  status page           {api}/ui  (sign in with the consumer key: it has admin)")
    echo("")
    echo("paste these:")
    echo(f"  export TB_KEY={key}")
    echo(f'  curl -s -H "Authorization: Bearer $TB_KEY" {api}/v1/tokens/demo-api')
    echo(
        f'  curl -s -H "Authorization: Bearer $(curl -s -H "Authorization: Bearer $TB_KEY" '
        f"{api}/v1/tokens/demo-api | python3 -c 'import json,sys; "
        f'print(json.load(sys.stdin)["access_token"])\')" {upstream}/api/data'
    )
    echo(
        f'  curl -sL -H "Authorization: Bearer $TB_KEY" {api}/v1/redirects/downloads/reports/q3.pdf'
    )
    echo(f"  curl -s {proxy.url}/api/data {proxy.url}/api/data   # one connection, one account")
    echo(f"  curl -s {proxy.health_url}/health")
    echo(
        f'  curl -s -X POST -H "Authorization: Bearer $TB_KEY" -H "Content-Type: application/json"'
        f""" -d '{{"kind":"warm","params":{{"provider":"demo-db"}}}}' {api}/v1/jobs"""
    )
    echo(f'  curl -sN -H "Authorization: Bearer $TB_KEY" {api}/v1/jobs/JOB_ID/stream')
    echo("")


def _show_tokens(echo: Callable[[str], None], broker: Broker, idp: AuthorizationServer) -> None:
    for provider in sorted(broker.settings.providers):
        accounts: list[str | None] = [*broker.accounts(provider)] or [None]
        for account in accounts:
            token = broker.get_token(provider, account=account)
            who = f" ({account})" if account else ""
            status = httpx.get(
                idp.resource_url, auth=broker.httpx_auth(provider, account=account)
            ).status_code
            # A fingerprint, never the token: terminals are scrolled back, shared and logged.
            fingerprint = hashlib.sha256(token.access_token.encode()).hexdigest()[:12]
            echo(
                f"{provider}{who}: {token.token_type} token sha256:{fingerprint} "
                f"(expires in {token.expires_in} s; demo resource says {status})"
            )


def _check_curl_lines(
    echo: Callable[[str], None], api: str, upstream: str, key: str, proxy: ServedProxy
) -> None:
    """Do what the printed curl lines do, so the demo proves they work."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=10) as client:
        token = client.get(f"{api}/v1/tokens/demo-api", headers=headers).json()["access_token"]
        data = client.get(f"{upstream}/api/data", headers={"Authorization": f"Bearer {token}"})
        hop = client.get(f"{api}/v1/redirects/downloads/reports/q3.pdf", headers=headers)
        download = client.get(hop.headers["location"]) if hop.status_code == 302 else hop
    with httpx.Client(timeout=10) as client:  # one connection through the proxy
        proxied = [client.get(f"{proxy.url}/api/data") for _ in range(2)]
    health = httpx.get(f"{proxy.health_url}/health", timeout=10)
    echo(
        f"checked: token read 200, upstream {data.status_code}, redirect {hop.status_code} "
        f"→ download {download.status_code}, proxy {' '.join(str(r.status_code) for r in proxied)} "
        f"(health {health.status_code})"
    )


def _label(event: Event) -> str:
    return f"{event.provider} ({event.key})" if event.key else event.provider
