"""The container files without Docker: the Dockerfile and compose.yaml are parsed, and the
image's entry point runs with the compose broker's config and environment, under the
image's non-root uid, with its config path and working folder mirrored in a temp root."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from redis_server import RedisServer, require_redis
from support import free_port, http_status, terminate, wait_for
from tokenbroker.core.crypto import generate_key
from tokenbroker.testing import AuthorizationServer

ROOT = Path(__file__).resolve().parent.parent


def dockerfile() -> dict[str, str]:
    """The Dockerfile's instructions (continuation lines joined; the last of each kind)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found[word.upper()] = rest.strip()
    return found


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_dockerfile_is_slim_non_root_serve_with_livez_healthcheck() -> None:
    """Slim Python base, a numeric non-root USER, `tokenbroker serve --config P` as
    ENTRYPOINT + CMD, and a HEALTHCHECK that asks /livez."""
    found = dockerfile()
    assert re.fullmatch(r"python:3\.\d+-slim", found["FROM"])
    uid = found["USER"].partition(":")[0]
    assert uid.isdigit() and int(uid) != 0
    command = json.loads(found["ENTRYPOINT"]) + json.loads(found["CMD"])
    assert command[:3] == ["tokenbroker", "serve", "--config"]
    assert "/livez" in found["HEALTHCHECK"]


def test_compose_has_postgres_redis_two_brokers_and_the_proxy() -> None:
    """compose.yaml runs PostgreSQL, Redis, two broker replicas on one store and one Redis
    (the image's config path mounted read-only) and the proxy; no secret is written in it."""
    services = compose()["services"]
    assert {"postgres", "redis", "broker-1", "broker-2", "proxy"} <= set(services)
    command = json.loads(dockerfile()["CMD"])
    for name in ("broker-1", "broker-2"):
        broker = services[name]
        assert broker["command"] == command
        assert f"./deploy/tokenbroker.yaml:{command[-1]}:ro" in broker["volumes"]
        assert broker["environment"]["TOKENBROKER_STORE"].startswith("postgresql://")
        assert broker["environment"]["TOKENBROKER_REDIS"].startswith("redis://redis:")
    assert services["proxy"]["command"][0] == "proxy"
    text = (ROOT / "compose.yaml").read_text()
    assert "${POSTGRES_PASSWORD}" in text and "${TOKENBROKER_KEY}" in text


def same_interpreter(as_user: list[str]) -> bool:
    """Whether ``as_user`` runs this interpreter, with the redis extra importable."""
    check = "import sys, redis.asyncio; print(sys.version)"
    run = subprocess.run(  # noqa: S603
        [*as_user, sys.executable, "-c", check], capture_output=True, text=True, check=False
    )
    return run.returncode == 0 and run.stdout.strip() == sys.version


@pytest.fixture
def image_root() -> Iterator[Path]:
    """A temp folder standing in for the image's file system (readable by the image's uid)."""
    root = Path(tempfile.mkdtemp(prefix="tb-image-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_image_entry_point_serves_as_non_root_with_compose_config(
    image_root: Path, pg_url: str, auth_server: AuthorizationServer
) -> None:
    """The ENTRYPOINT + CMD, run as the image's uid (when the tests run as root) with the
    compose broker's environment (store and Redis pointed at the tests' own servers), reach
    healthy: the HEALTHCHECK command exits 0 and /health says ok with Redis connected."""
    require_redis()
    found = dockerfile()
    uid = int(found["USER"].partition(":")[0])
    command = json.loads(found["ENTRYPOINT"]) + json.loads(found["CMD"])
    config_path = Path(command[-1])
    config = image_root / config_path.relative_to("/")
    config.parent.mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "tokenbroker.yaml", config)
    config.chmod(0o644)
    workdir = image_root / found["WORKDIR"].lstrip("/")
    workdir.mkdir(parents=True)
    port = free_port()
    redis = RedisServer()
    redis.start()
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "CI")},
        "PYTHONDONTWRITEBYTECODE": "1",
        **compose()["services"]["broker-1"]["environment"],
        "TOKENBROKER_STORE": pg_url,
        "TOKENBROKER_REDIS": redis.url,
        "TOKENBROKER_KEY": generate_key(),
        "API_TOKEN_URL": auth_server.token_url,
        "API_CLIENT_ID": "id",
        "API_CLIENT_SECRET": "secret-value-never-logged",
        "TOKENBROKER_LISTEN": f"127.0.0.1:{port}",
    }
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chown(workdir, uid, uid)
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        if not same_interpreter(as_user):
            # This machine's interpreter lives under /root, which the image's uid cannot read
            # (in the image Python is in /usr/local): run as this user instead.
            as_user = []
    binary = str(Path(sys.executable).with_name(command[0]))
    argv = [*as_user, binary, *command[1:-1], str(config)]
    process = subprocess.Popen(  # noqa: S603
        argv, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: process.poll() is not None or http_status(url + "/livez") == 200,
            "the entry point to listen",
            60,
        )
        assert process.poll() is None, process.communicate()[1]
        probe = json.loads(found["HEALTHCHECK"].partition("CMD")[2])
        probe = [p.replace("127.0.0.1:8750", f"127.0.0.1:{port}") for p in probe]
        probe[0] = sys.executable
        assert subprocess.run([*as_user, *probe], check=False, env=env).returncode == 0  # noqa: S603
        wait_for(lambda: http_status(url + "/health") == 200, "/health")
        if as_user:
            status = Path(f"/proc/{process.pid}/status").read_text()
            assert re.search(rf"^Uid:\s+{uid}\s", status, re.MULTILINE)
    finally:
        stderr = terminate(process) or ""
        redis.close()
    assert process.returncode == 0, stderr
    assert "secret-value-never-logged" not in stderr
