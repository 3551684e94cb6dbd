"""The command line: check, token, keygen and dev, through click's runner."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from support import client_credentials, login
from tokenbroker.cli.main import main
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
    and its health), and refresh lines, showing token fingerprints only."""
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
    assert all(" token sha256:" in line for line in token_lines)


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
    from tokenbroker.core.crypto import generate_key

    old, new = generate_key(), generate_key()
    runner = CliRunner()
    config = file_config(tmp_path, auth_server, [old])
    token = runner.invoke(main, ["token", "svc", "--config", str(config)]).output.strip()
    assert (tmp_path / "tb.db").exists()  # relative to the config file
    status = runner.invoke(main, ["status", "--config", str(config)])
    assert status.exit_code == 0, status.output
    assert re.search(r"^svc +\(configured\) +- +valid ", status.output, re.M), status.output
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
    from tokenbroker.core.crypto import generate_key

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
    from tokenbroker.api.app import create_app
    from tokenbroker.config import load_settings
    from tokenbroker.core.crypto import generate_key
    from tokenbroker.engine.consumers import hash_key

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


@pytest.mark.parametrize(
    ("command", "missing", "extra"),
    [
        (["serve"], "uvicorn", "server"),
        (["proxy"], "fastapi", "server"),
        (["dev", "--duration", "0"], "authlib", "testing"),
    ],
)
def test_a_missing_extra_names_the_pip_install_line(
    tmp_path: Path, command: list[str], missing: str, extra: str
) -> None:
    """Without an optional dependency, a command says which ``pip install 'tokenbroker[…]'`` to
    run (exit 2), not a traceback."""
    code = (
        "import sys\n"
        f"sys.modules[{missing!r}] = None  # as if the package were not installed\n"
        "from tokenbroker.cli import main\n"
        f"main({command!r} + ['--config', 'tb.yaml'] * ({command[0]!r} != 'dev'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"pip install 'tokenbroker[{extra}]'" in done.stderr


# -- check finds what serve, proxy and token would refuse (operator experience, item 1) -----


def check(path: Path) -> tuple[int, str]:
    """Run ``tokenbroker check`` on ``path``: exit code and everything printed."""
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    return result.exit_code, result.output


def test_check_lists_every_problem_in_one_run(tmp_path: Path) -> None:
    """A config with problems in every section gets all of them, with field paths, in one run
    (exit 2), and no value from the file."""
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(
        "store: memory\n"
        f"encryption_keys: [{CANARY}]\n"
        "defaults: {deadline_seconds: 10, lease_seconds: 5}\n"
        "providers:\n"
        "  svc: {grant: client_credentials, token_url: 'https://i/t', client_id: c,"
        f" client_secret: {CANARY}}}\n"
        "server: {listen: nowhere, rate_limit: lots, cors_origins: 'https://a.example'}\n"
        "telemetry: {log_level: loud, log_format: xml}\n"
        f"consumers: {{etl: {{api_key_sha256: {CANARY}, allow: [ghost]}}}}\n"
    )
    code, output = check(path)
    assert code == 2
    for where in (
        "encryption_keys.0:",
        "defaults.lease_seconds:",
        "server.listen:",
        "server.rate_limit:",
        "server.cors_origins:",
        "telemetry.log_level:",
        "telemetry.log_format:",
        "consumers.etl.api_key_sha256:",
        "consumers.etl.allow.0: no provider named 'ghost'",
    ):
        assert where in output, output
    assert CANARY not in output


def test_check_prints_warnings_and_passes(tmp_path: Path) -> None:
    """Settings nothing reads yet (telemetry.otlp_endpoint) are warnings: check says so, says
    nothing of a redis URL it can use (the redis extra is installed), never shows its password,
    and still exits 0."""
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(
        f"store: memory\nredis: redis://:{CANARY}@cache:6379/0\n"
        "telemetry: {otlp_endpoint: 'http://otel:4317'}\n"
    )
    code, output = check(path)
    assert code == 0, output
    assert "redis: needs" not in output and "redis: is not used" not in output
    assert "warning: telemetry.otlp_endpoint: is not used yet" in output
    assert CANARY not in output


@pytest.mark.parametrize(
    "server",
    [{"listen": "nowhere"}, {"listen": "127.0.0.1:0", "cors_origins": "https://a.example"}],
)
def test_serve_refuses_bad_server_settings_without_a_traceback(
    tmp_path: Path, server: dict[str, object]
) -> None:
    """serve with a bad server.listen or a string cors_origins exits 2 with check's message
    naming the field, not a traceback (and does not start serving)."""
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(yaml.safe_dump({"store": "memory", "server": server}))
    done = subprocess.run(
        [sys.executable, "-m", "tokenbroker.cli", "serve", "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    field = "server.listen" if server["listen"] == "nowhere" else "server.cors_origins"
    assert f"{field}: " in done.stderr


def test_check_reports_a_store_under_another_key(tmp_path: Path) -> None:
    """check opens the store read-only and says a stored secret is under a key that is not in
    encryption_keys (by key id, never a key), changing nothing in the folder."""
    import hashlib

    from tokenbroker.core.crypto import Keyring, decode_key, generate_key
    from tokenbroker.core.secret import Secret
    from tokenbroker.store import open_store

    old, new = generate_key(), generate_key()
    store = open_store(f"sqlite:///{tmp_path / 'tb.db'}", Keyring([Secret(old)]))
    store.add_signing_key("kid-1", "EdDSA", b"private key bytes")
    store.close()
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(yaml.safe_dump({"store": "sqlite:///tb.db", "encryption_keys": [new]}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, output = check(path)
    assert code == 2, output
    key_id = hashlib.sha256(decode_key(old)).digest()[:8].hex()
    assert f"encryption_keys: 1 stored secret(s) are encrypted with key {key_id}" in output
    assert old not in output and new not in output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    path.write_text(yaml.safe_dump({"store": "sqlite:///tb.db", "encryption_keys": [new, old]}))
    path.chmod(0o600)  # keys written in the file: only the owner may read it (no warning)
    schema = f"store {tmp_path / 'tb.db'}: schema version 5 is current\n"
    assert check(path) == (0, f"{path}: ok (0 providers: none)\n{schema}")


@pytest.mark.parametrize("where", ["missing/tb.db", "a-file/tb.db"])
def test_check_reports_a_store_folder_it_cannot_write(tmp_path: Path, where: str) -> None:
    """check says when the store's folder does not exist or cannot take new files (serve could
    not create the store or its journal there), and creates nothing."""
    from tokenbroker.core.crypto import generate_key

    (tmp_path / "a-file").write_text("not a folder")
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(
        yaml.safe_dump({"store": f"sqlite:///{where}", "encryption_keys": [generate_key()]})
    )
    code, output = check(path)
    assert code == 2, output
    assert f"store: cannot create files in {(tmp_path / where).parent}" in output
    assert not (tmp_path / "missing").exists()
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(
        yaml.safe_dump({"store": "sqlite:///new.db", "encryption_keys": [generate_key()]})
    )
    assert check(fresh)[0] == 0
    assert not (tmp_path / "new.db").exists()


@pytest.mark.parametrize("command", ["serve", "proxy"])
def test_a_bad_listen_flag_is_a_usage_error(tmp_path: Path, command: str) -> None:
    """serve/proxy --listen without HOST:PORT is a usage error naming the option (exit 2),
    before anything starts."""
    path = tmp_path / "tokenbroker.yaml"
    path.write_text("store: memory\n")
    result = CliRunner().invoke(main, [command, "--listen", "nowhere", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "--listen" in result.output and "HOST:PORT" in result.output


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


def status_config(tmp_path: Path, server: AuthorizationServer, key: str, **svc: object) -> Path:
    """A file store with a client-credentials provider and a login pool whose bob is refused
    (``svc={"pool": False}`` leaves the pool out)."""
    with_pool = bool(svc.pop("pool", True))
    path = tmp_path / "tokenbroker.yaml"
    pool = login(
        server,
        credentials=[
            {"username": "alice", "password": "alice-pw"},
            {"username": "bob", "password": CANARY},
        ],
    )
    config = {
        "store": "sqlite:///tb.db",
        "encryption_keys": [key],
        "providers": {
            "svc": client_credentials(server, **svc),
            **({"db": pool} if with_pool else {}),
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_status_names_provider_scope_account_in_utc_with_the_last_error(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """status rows name provider, scope and account (no hash), say UTC, and show a failed
    credential's last error class and code, never a secret."""
    from tokenbroker.core.crypto import generate_key

    config = status_config(tmp_path, auth_server, generate_key())
    runner = CliRunner()
    for command in (["svc"], ["svc", "--scope", "write read"], ["db", "--account", "alice"]):
        done = runner.invoke(main, ["token", *command, "--config", str(config)])
        assert done.exit_code == 0, done.output
    refused = runner.invoke(main, ["token", "db", "--account", "bob", "--config", str(config)])
    assert refused.exit_code == 4
    result = runner.invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "UTC" in lines[0]
    assert len(lines) == 5, result.output
    out = result.output
    assert re.search(r"^svc +\(configured\) +- +valid +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", out, re.M)
    assert re.search(r"^svc +read write +- +valid ", out, re.M), out  # as a consumer asked
    assert re.search(r"^db +- +alice +valid ", out, re.M), out
    bob = re.search(r"^db +- +bob +failed .*$", out, re.M)
    assert bob is not None, out
    assert "ClientAuthenticationError (HTTP 401" in bob.group(0)
    assert not re.search(r"[0-9a-f]{16}", result.output), result.output
    assert CANARY not in result.output and "alice-pw" not in result.output


def test_status_shows_a_key_the_config_no_longer_has_as_stale(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """A stored row no configured key maps to (the client id changed, the provider is gone)
    shows as (stale key)."""
    from tokenbroker.core.crypto import generate_key

    key = generate_key()
    config = status_config(tmp_path, auth_server, key)
    for command in (["svc"], ["db"]):
        assert CliRunner().invoke(main, ["token", *command, "--config", str(config)]).exit_code == 0
    config = status_config(tmp_path, auth_server, key, client_id="renamed-client", pool=False)
    result = CliRunner().invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    db, svc = result.output.splitlines()[1:]
    assert re.match(r"svc +\(stale key\) +- +valid ", svc), svc
    assert re.match(r"db +\(stale key\) +alice +valid ", db), db
    assert not re.search(r"[0-9a-f]{16}", result.output), result.output


def test_status_names_rows_stored_before_rows_carried_their_scope(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """Rows of a schema-3 store (no scope/account columns) are migrated and named from the
    config's keys; a consumer-scope row the config cannot name shows as (stale key)."""
    import sqlite3
    from contextlib import closing

    from tokenbroker.core.crypto import generate_key
    from tokenbroker.store.sqlite_schema import MIGRATIONS

    config = status_config(tmp_path, auth_server, generate_key())
    runner = CliRunner()
    for command in (["svc"], ["svc", "--scope", "write"], ["db", "--account", "bob"]):
        runner.invoke(main, ["token", *command, "--config", str(config)])
    with closing(sqlite3.connect(tmp_path / "tb.db")) as db, db:
        db.execute("ALTER TABLE tb_credential DROP COLUMN scope")
        db.execute("ALTER TABLE tb_credential DROP COLUMN account")
        for table in ("tb_job", "tb_job_event", "tb_job_schedule"):  # migration 5 (jobs)
            db.execute(f"DROP TABLE {table}")
        db.execute("UPDATE tb_meta SET value = '3' WHERE name = 'schema_version'")
    result = runner.invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert len(out.splitlines()) == 4, out
    assert re.search(r"^svc +\(configured\) +- +valid ", out, re.M), out
    assert re.search(r"^svc +\(stale key\) +- +valid ", out, re.M), out
    assert re.search(r"^db +- +bob +failed .*ClientAuthenticationError", out, re.M), out
    assert not re.search(r"[0-9a-f]{16}", out), out
    with closing(sqlite3.connect(tmp_path / "tb.db")) as db:
        version = db.execute("SELECT value FROM tb_meta WHERE name = 'schema_version'").fetchone()
    assert version == (str(len(MIGRATIONS)),)


LITERAL = {
    "client_secret": {"client_secret": CANARY},
    "default of a variable": {"client_secret": "${UNSET_CHECK_SECRET:-" + CANARY + "}"},
}


@pytest.mark.parametrize("how", sorted(LITERAL))
def test_check_warns_about_a_literal_secret_others_can_read(
    tmp_path: Path, auth_server: AuthorizationServer, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A config file with a secret written in it (not ${VAR}) and mode 0644 gets a warning
    naming the file, the field, the mode and `chmod 600`, never the secret; check still
    passes. At 0600 there is no such warning."""
    monkeypatch.delenv("UNSET_CHECK_SECRET", raising=False)
    path = write_config(tmp_path, {"svc": client_credentials(auth_server, **LITERAL[how])})
    path.chmod(0o644)
    code, output = check(path)
    assert code == 0, output
    warning = (
        f"warning: providers.svc.client_secret: is a secret written in {path}, which group or"
        f" others may read (mode 0644): run `chmod 600 {path}`"
    )
    assert warning in output
    assert CANARY not in output
    path.chmod(0o600)
    code, output = check(path)
    assert (code, "chmod" in output) == (0, False), output


def test_check_accepts_readable_configs_whose_secrets_come_from_variables(
    tmp_path: Path, auth_server: AuthorizationServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Secrets given as ${VAR} (a redis URL's password too) and a login request template's
    "{password}" placeholder are not literal secrets: a 0644 file gets no warning."""
    monkeypatch.setenv("CHECK_SECRET", CANARY)
    providers = {
        "svc": client_credentials(auth_server, client_secret="${CHECK_SECRET}"),
        "db": login(
            auth_server,
            credentials=[{"username": "alice", "password": "${CHECK_SECRET}"}],
            request={"json": {"username": "{username}", "password": "{password}"}},
        ),
    }
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "store": "memory",
                "redis": "redis://:${CHECK_SECRET}@cache:6379/0",
                "providers": providers,
            }
        )
    )
    path.chmod(0o644)
    code, output = check(path)
    assert code == 0, output
    assert "chmod" not in output and CANARY not in output


def test_check_warns_about_a_credentials_file_others_can_read(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """A login provider's credentials_file that group or others may read gets a warning naming
    it and its mode, never a password; the config file itself (no literal secret) gets none."""
    accounts = tmp_path / "accounts.txt"
    accounts.write_text(f"alice:{CANARY}\n")
    accounts.chmod(0o640)
    provider = login(auth_server, credentials_file="accounts.txt")
    del provider["credentials"]
    path = write_config(tmp_path, {"db": provider})
    path.chmod(0o644)
    code, output = check(path)
    assert code == 0, output
    assert (
        f"warning: providers.db.credentials_file: {accounts} holds passwords, which group or"
        f" others may read (mode 0640): run `chmod 600 {accounts}`" in output
    )
    assert output.count("chmod") == 1 and CANARY not in output


def test_consumers_add_subject_and_delegation_rules(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """consumers add --allow delegate:svc --subject alice stores both (list shows them); a
    malformed --subject or delegate rule is a usage error (exit 2) that stores nothing."""
    from tokenbroker.core.crypto import generate_key

    config = file_config(tmp_path, auth_server, [generate_key()])
    runner = CliRunner()
    base = ["consumers", "add", "--config", str(config)]
    added = runner.invoke(main, [*base, "portal", "--allow", "delegate:svc", "--subject", "alice"])
    assert added.exit_code == 0, added.output
    for bad in (["--allow", "delegate:svc", "--subject", "a b"], ["--allow", "delegate"]):
        refused = runner.invoke(main, [*base, "other", *bad])
        assert refused.exit_code == 2, refused.output
    listed = runner.invoke(main, ["consumers", "list", "--config", str(config)])
    assert "portal\tstore\tdelegate:svc, subject=alice" in listed.output
    assert "other" not in listed.output
