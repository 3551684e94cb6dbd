"""The command line: check, token, keygen and dev, through click's runner."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from support import client_credentials
from tokenbroker.cli import main
from tokenbroker.testing import AuthorizationServer

CANARY = "CANARY_SECRET_5b0c1e"


def write_config(tmp_path: Path, providers: dict[str, object]) -> Path:
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(yaml.safe_dump({"store": "memory", "providers": providers}))
    return path


def test_check_ok(tmp_path: Path, auth_server: AuthorizationServer) -> None:
    """A valid config passes check and lists its providers."""
    path = write_config(tmp_path, {"svc": client_credentials(auth_server)})
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0
    assert "1 providers: svc" in result.output


def test_check_names_fields_and_variables_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check exits 2, naming each bad field and the missing variable; no secret value is printed."""
    monkeypatch.delenv("MISSING_SECRET_VAR", raising=False)
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(
        "providers:\n"
        "  a:\n"
        "    grant: client_credentials\n"
        "    token_url: http://idp.example/token\n"
        f"    client_id: {CANARY}-id\n"
        f"    client_secret: {CANARY}\n"
        "    retries: many\n"
        "  b:\n"
        "    grant: client_credentials\n"
        "    token_url: https://idp.example/token\n"
        "    client_id: x\n"
        "    client_secret: ${MISSING_SECRET_VAR}\n"
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 2
    assert "providers.a.token_url" in result.output
    assert "providers.a.retries" in result.output
    assert "providers.b.client_secret: environment variable MISSING_SECRET_VAR is not set" in (
        result.output
    )
    assert CANARY not in result.output


def test_check_uses_tokenbroker_config_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth_server: AuthorizationServer
) -> None:
    """Without --config, TOKENBROKER_CONFIG names the file."""
    path = write_config(tmp_path, {"svc": client_credentials(auth_server)})
    monkeypatch.setenv("TOKENBROKER_CONFIG", str(path))
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 0, result.output


def test_token_prints_only_the_access_token(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """token PROVIDER prints exactly the access token the server issued."""
    path = write_config(tmp_path, {"svc": client_credentials(auth_server)})
    result = CliRunner().invoke(main, ["token", "svc", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == auth_server.issued_access_tokens[-1]


def test_token_errors_exit_nonzero(tmp_path: Path, auth_server: AuthorizationServer) -> None:
    """An unknown provider exits 3 and a rejected client exits 4, each with a message on stderr."""
    path = write_config(tmp_path, {"svc": client_credentials(auth_server, client_secret="wrong")})
    runner = CliRunner()
    unknown = runner.invoke(main, ["token", "nope", "--config", str(path)])
    assert unknown.exit_code == 3
    rejected = runner.invoke(main, ["token", "svc", "--config", str(path)])
    assert rejected.exit_code == 4
    assert "error:" in rejected.output


def test_keygen_prints_32_random_bytes() -> None:
    """keygen prints a URL-safe base64 key of 32 bytes, different each time."""
    runner = CliRunner()
    first = runner.invoke(main, ["keygen"]).output.strip()
    second = runner.invoke(main, ["keygen"]).output.strip()
    assert len(base64.urlsafe_b64decode(first)) == 32
    assert first != second


def test_dev_demo_prints_tokens_and_background_refreshes() -> None:
    """dev prints a token per demo provider, curl lines it has checked itself (token read,
    upstream call, delegated redirect and download, two requests through the token proxy
    and its health), and refresh lines without tokens."""
    result = CliRunner().invoke(main, ["dev", "--duration", "4", "--lifetime", "3", "--port", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    token_lines = [line for line in lines if "demo resource says 200" in line]
    assert len(token_lines) == 4
    assert (
        "checked: token read 200, upstream 200, redirect 302 → download 200, "
        "proxy 200 200 (health 200)"
    ) in lines
    assert any(line.startswith("  export TB_KEY=tbk_") for line in lines)
    assert any("refreshed demo-api" in line for line in lines)
    refresh_lines = [line for line in lines if "refreshed" in line]
    for line in token_lines:
        token = line.split()[2]
        assert all(token not in r for r in refresh_lines)


def file_config(tmp_path: Path, server: AuthorizationServer, keys: list[str]) -> Path:
    path = tmp_path / "tokenbroker.yaml"
    config = {
        "store": "sqlite:///tb.db",
        "encryption_keys": keys,
        "providers": {"svc": client_credentials(server)},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_status_rotate_key_and_missing_key(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """status lists the stored credential without secrets; rotate-key makes the old key unneeded;
    a store whose key is missing refuses to start with a message naming encryption_keys."""
    from tokenbroker.crypto import generate_key

    old, new = generate_key(), generate_key()
    runner = CliRunner()
    config = file_config(tmp_path, auth_server, [old])
    token = runner.invoke(main, ["token", "svc", "--config", str(config)]).output.strip()
    assert (tmp_path / "tb.db").exists()  # relative to the config file
    status = runner.invoke(main, ["status", "--config", str(config)])
    assert status.exit_code == 0, status.output
    assert "valid" in status.output and "svc:" in status.output
    assert token not in status.output and old not in status.output

    only_new = file_config(tmp_path, auth_server, [new])
    refused = runner.invoke(main, ["status", "--config", str(only_new)])
    assert refused.exit_code == 2
    assert "encryption_keys" in refused.output and "not among" in refused.output

    both = file_config(tmp_path, auth_server, [new, old])
    rotated = runner.invoke(main, ["rotate-key", "--config", str(both)])
    assert rotated.exit_code == 0, rotated.output
    assert "re-encrypted 1 secret" in rotated.output
    only_new = file_config(tmp_path, auth_server, [new])
    again = runner.invoke(main, ["token", "svc", "--config", str(only_new)])
    assert again.exit_code == 0, again.output
    assert again.output.strip() == token
    assert auth_server.count("client_credentials") == 1

    no_key = file_config(tmp_path, auth_server, [])
    for command in (["check"], ["token", "svc"]):
        result = runner.invoke(main, [*command, "--config", str(no_key)])
        assert result.exit_code == 2
        assert "encryption_keys" in result.output


def test_status_on_an_empty_store(tmp_path: Path, auth_server: AuthorizationServer) -> None:
    """status on a fresh store says there is nothing stored yet."""
    from tokenbroker.crypto import generate_key

    config = file_config(tmp_path, auth_server, [generate_key()])
    result = CliRunner().invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 0
    assert "no stored credentials" in result.output


def test_consumers_add_prints_the_key_once_and_stores_only_its_hash(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """consumers add prints the key alone on the last stdout line; the store holds only its
    SHA-256; the key then works against the HTTP API and stops working once removed."""
    from support import Served
    from tokenbroker import Broker
    from tokenbroker.app import create_app
    from tokenbroker.config import load_settings
    from tokenbroker.consumers import hash_key
    from tokenbroker.crypto import generate_key

    config = file_config(tmp_path, auth_server, [generate_key()])
    runner = CliRunner()
    added = runner.invoke(
        main, ["consumers", "add", "etl", "--allow", "svc:read", "--config", str(config)]
    )
    assert added.exit_code == 0, added.output
    key = added.stdout.strip().splitlines()[-1]
    assert key.startswith("tbk_") and len(key) == 47
    assert len(added.stdout.strip().splitlines()) == 1
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("tb.db*"))
    assert key.encode() not in raw
    assert hash_key(key).encode() in raw
    again = runner.invoke(
        main, ["consumers", "add", "etl", "--allow", "svc", "--config", str(config)]
    )
    assert again.exit_code != 0
    listed = runner.invoke(main, ["consumers", "list", "--config", str(config)])
    assert "etl\tstore\tsvc:read" in listed.output and key not in listed.output
    bad = runner.invoke(
        main, ["consumers", "add", "x", "--allow", "Bad Rule!", "--config", str(config)]
    )
    assert bad.exit_code == 2

    with Broker(load_settings(config)) as broker, Served(create_app(broker)) as client:
        ok = client.get("/v1/tokens/svc", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    removed = runner.invoke(main, ["consumers", "remove", "etl", "--config", str(config)])
    assert removed.exit_code == 0
    with Broker(load_settings(config)) as broker, Served(create_app(broker)) as client:
        gone = client.get("/v1/tokens/svc", headers={"Authorization": f"Bearer {key}"})
        assert gone.status_code == 401
    assert (
        runner.invoke(main, ["consumers", "remove", "etl", "--config", str(config)]).exit_code == 3
    )


def test_check_accepts_a_refresh_token_provider_with_a_secret_and_no_client_auth(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """check accepts a confidential refresh_token provider that names no client_auth."""
    provider = {
        "grant": "refresh_token",
        "token_url": auth_server.token_url,
        "client_id": "rt-conf",
        "client_secret": CANARY,
        "refresh_token": "seed",
    }
    result = CliRunner().invoke(
        main, ["check", "--config", str(write_config(tmp_path, {"rt": provider}))]
    )
    assert result.exit_code == 0, result.output
    assert CANARY not in result.output
