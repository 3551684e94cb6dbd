"""`tokenbroker serve` as a real process: consumer revocation without restart, and which
client address the API sees (``server.trusted_proxies``)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import client_credentials, free_port, http_status, wait_for
from tokenbroker.core.crypto import generate_key
from tokenbroker.engine.consumers import new_key
from tokenbroker.testing import AuthorizationServer, RecordingUpstream

KEY_HEADER = "X-Tokenbroker-Key"
#: Revocation and new consumers must take effect within this long, without a restart.
PROPAGATION_SECONDS = 2.0
#: The API's refusals of a key it does not know (429: the address's failed-key checks are spent).
REFUSED = (401, 429)


@contextmanager
def _serving(config: Path, tmp_path: Path) -> Iterator[str]:
    """Run `tokenbroker serve` on a free loopback port until the block ends; yield its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "serve.out").open("w") as out, (tmp_path / "serve.err").open("w") as err:
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(config)]
            + ["--listen", f"127.0.0.1:{port}"],
            stdout=out,
            stderr=err,
        )
        try:
            wait_for(
                lambda: process.poll() is not None or http_status(url + "/livez") == 200, timeout=20
            )
            assert process.poll() is None, (tmp_path / "serve.err").read_text()
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert process.returncode == 0, (tmp_path / "serve.err").read_text()


def _cli(config: Path, *args: str) -> str:
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "tokenbroker.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def upstream(auth_server: AuthorizationServer) -> Iterator[RecordingUpstream]:
    """An upstream that accepts only tokens the authorization server currently accepts."""
    with RecordingUpstream(auth_server) as served:
        yield served


def _revocation_config(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> tuple[Path, str]:
    """A file store, provider ``svc``, and a proxy that requires consumer keys; the config
    file and the proxied URL."""
    proxy_port = free_port()
    config = _write(
        tmp_path / "tokenbroker.yaml",
        {
            "store": f"sqlite:///{tmp_path / 'tb.db'}",
            "encryption_keys": [generate_key()],
            "providers": {"svc": client_credentials(auth_server)},
            "proxy": {
                "listen": f"127.0.0.1:{proxy_port}",
                "consumer_header": KEY_HEADER,
                "routes": [
                    {"prefix": "/", "upstream": upstream.url, "provider": "svc", "mode": "shared"}
                ],
            },
        },
    )
    return config, f"http://127.0.0.1:{proxy_port}/api/echo"


def test_a_removed_consumer_is_refused_without_restart(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """`consumers remove` while `serve` runs: within 2 s the API answers the removed key 401
    and the proxy (``consumer_header``) 401; a remaining consumer is unaffected."""
    config, proxied = _revocation_config(tmp_path, auth_server, upstream)
    key = _cli(config, "consumers", "add", "gone", "--allow", "svc").splitlines()[-1]
    kept = _cli(config, "consumers", "add", "kept", "--allow", "svc").splitlines()[-1]
    bearer = {"Authorization": f"Bearer {key}"}
    with _serving(config, tmp_path) as api:
        assert http_status(api + "/v1/tokens/svc", bearer) == 200
        assert http_status(proxied, {KEY_HEADER: key}) == 200

        _cli(config, "consumers", "remove", "gone")
        wait_for(
            lambda: http_status(api + "/v1/tokens/svc", bearer) == 401, timeout=PROPAGATION_SECONDS
        )
        wait_for(
            lambda: http_status(proxied, {KEY_HEADER: key}) == 401, timeout=PROPAGATION_SECONDS
        )
        assert http_status(api + "/v1/providers", bearer) == 401
        assert http_status(api + "/v1/tokens/svc", {"Authorization": f"Bearer {kept}"}) == 200
        assert http_status(proxied, {KEY_HEADER: kept}) == 200


def test_consumers_added_and_removed_while_serving_take_effect_without_restart(
    tmp_path: Path, auth_server: AuthorizationServer, upstream: RecordingUpstream
) -> None:
    """A key made by `consumers add` while `serve` runs works on the API and the proxy within
    2 s; after `consumers remove` both refuse it within 2 s (the API 401, the proxy 401)."""
    config, proxied = _revocation_config(tmp_path, auth_server, upstream)
    with _serving(config, tmp_path) as api:
        key = _cli(config, "consumers", "add", "late", "--allow", "svc").splitlines()[-1]
        bearer = {"Authorization": f"Bearer {key}"}

        wait_for(
            lambda: http_status(api + "/v1/tokens/svc", bearer) == 200, timeout=PROPAGATION_SECONDS
        )
        wait_for(
            lambda: http_status(proxied, {KEY_HEADER: key}) == 200, timeout=PROPAGATION_SECONDS
        )

        _cli(config, "consumers", "remove", "late")
        # The API refuses with 401, or 429 once this address has used up its failed-key
        # checks (polling while the key was still unknown spends them).
        wait_for(
            lambda: http_status(api + "/v1/tokens/svc", bearer) in REFUSED,
            timeout=PROPAGATION_SECONDS,
        )
        wait_for(
            lambda: http_status(proxied, {KEY_HEADER: key}) == 401, timeout=PROPAGATION_SECONDS
        )
        # Refused for good, not by a flicker.
        assert http_status(api + "/v1/providers", bearer) in REFUSED
        assert http_status(proxied, {KEY_HEADER: key}) == 401


def _bad_key_statuses(api: str, count: int) -> list[int | None]:
    """``count`` requests with unknown keys, each claiming a different X-Forwarded-For."""
    return [
        http_status(
            api + "/v1/providers",
            {"Authorization": f"Bearer {new_key()}", "X-Forwarded-For": f"198.51.100.{i}"},
        )
        for i in range(count)
    ]


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(tmp_path: Path) -> None:
    """By default (`server.trusted_proxies: []`) a client on 127.0.0.1 cannot claim another
    address with X-Forwarded-For: a new claimed address per request gets no new failed-key
    budget, so the 11th unknown key within a minute is refused with 429."""
    config = _write(tmp_path / "tokenbroker.yaml", {"store": "memory"})
    with _serving(config, tmp_path) as api:
        statuses = _bad_key_statuses(api, 11)
    assert statuses == [401] * 10 + [429]


def test_trusted_proxies_make_forwarded_for_the_client_address(tmp_path: Path) -> None:
    """With `server.trusted_proxies: [127.0.0.1]` the API attributes a request to the address in
    X-Forwarded-For: eleven unknown keys from eleven forwarded addresses are eleven 401s."""
    config = _write(
        tmp_path / "tokenbroker.yaml",
        {"store": "memory", "server": {"trusted_proxies": ["127.0.0.1"]}},
    )
    with _serving(config, tmp_path) as api:
        statuses = _bad_key_statuses(api, 11)
    assert statuses == [401] * 11
