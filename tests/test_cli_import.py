"""tokenbroker import tpp: a tpp config.yaml written like tpp's config.example.yaml becomes a
tokenbroker.yaml that `tokenbroker check` passes, with the password only in .env (0600),
unmapped keys printed one a line, and nothing written for a broken tpp file."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner

from tokenbroker import Broker, parse_settings
from tokenbroker.cli.main import main
from tokenbroker.config import LoginProvider
from tokenbroker.testing import AuthorizationServer, ServedProxy

#: tpp's config.example.yaml (github.com/Yvictor/tpp), with its OTLP endpoint uncommented, a
#: tpp-targeted and a foreign log directive, and a key tpp does not know.
TPP_CONFIG = """\
# Token Pool Proxy Configuration

# Proxy listen address
listen: "0.0.0.0:8080"

# Health check server (optional but recommended for k8s/docker)
health_listen: "0.0.0.0:9090"

# Upstream DolphinDB server
upstream:
  host: "dolphindb.example.com"
  port: 8848
  tls: false

# Single credential - will be used to acquire `pool_size` tokens
credential:
  username: "your_username"
  password: "tpp-secret-pw-1234"

# Token pool configuration
token:
  pool_size: 200
  ttl_seconds: 3600
  refresh_check_seconds: 60

# Telemetry configuration (optional)
telemetry:
  otlp_endpoint: "http://localhost:4317"
  log_filter: "info,tpp=debug,pingora_core=warn"

retries: 3
"""
PASSWORD = "tpp-secret-pw-1234"


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CLI runner with no TOKENBROKER_KEY / TPP_* password in the environment."""
    for name in ("TOKENBROKER_KEY", "TOKENBROKER_CONFIG", "TPP_CREDENTIAL_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def test_import_writes_a_config_check_passes(tmp_path: Path, runner: CliRunner) -> None:
    """The written tokenbroker.yaml maps every tpp setting (login provider with 200 sessions
    of the one account, the pool route, both ports, refresh_check_seconds, metrics_compat:
    tpp, log_filter with tpp's target renamed); the password is only in .env (0600), never
    in the file or the output; each unmapped key is one printed line; check passes."""
    source = tmp_path / "tpp.yaml"
    source.write_text(TPP_CONFIG)
    out = tmp_path / "conf" / "tokenbroker.yaml"
    result = runner.invoke(main, ["import", "tpp", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert PASSWORD not in text and PASSWORD not in result.output
    env = (tmp_path / "conf" / ".env").read_text()
    assert f"TPP_CREDENTIAL_PASSWORD={PASSWORD}\n" in env
    assert "TOKENBROKER_KEY=" in env
    assert stat.S_IMODE((tmp_path / "conf" / ".env").stat().st_mode) == 0o600
    unmapped = [line for line in result.output.splitlines() if line.startswith("not mapped:")]
    assert len(unmapped) == 3
    assert any(line.startswith("not mapped: retries:") for line in unmapped)
    assert any("telemetry.otlp_endpoint" in line for line in unmapped)
    assert any("'pingora_core'" in line for line in unmapped)

    written = yaml.safe_load(text)
    assert written["proxy"] == {
        "listen": "0.0.0.0:8080",
        "health_listen": "0.0.0.0:9090",
        "refresh_check_seconds": 60,
        "metrics_compat": "tpp",
        "routes": [
            {
                "prefix": "/",
                "upstream": "http://dolphindb.example.com:8848",
                "provider": "dolphindb",
                "mode": "pool",
            }
        ],
    }
    assert written["telemetry"] == {"log_filter": "info,tokenbroker=debug"}
    settings = parse_settings(
        text,
        {
            "TOKENBROKER_KEY": env.split("TOKENBROKER_KEY=")[1][:-1],
            "TPP_CREDENTIAL_PASSWORD": PASSWORD,
        },
    )
    provider = settings.providers["dolphindb"]
    assert isinstance(provider, LoginProvider)
    assert provider.login_url == "http://dolphindb.example.com:8848/api/login"
    assert provider.token_path == "result.0"
    assert provider.ttl_seconds == 3600
    [account] = provider.credentials
    assert (account.username, account.sessions) == ("your_username", 200)
    assert account.password.reveal() == PASSWORD

    checked = runner.invoke(main, ["check", "--config", str(out)])
    assert checked.exit_code == 0, checked.output
    assert f"{out}: ok (1 providers: dolphindb)" in checked.output
    assert PASSWORD not in checked.output


def test_tls_and_defaults_and_an_existing_env(tmp_path: Path, runner: CliRunner) -> None:
    """tls: true gives https URLs; tpp's defaults (pool_size 10, ttl 3600, check 60) are
    written; a password left to the environment is not put in .env, whose existing lines
    are kept; the output says to set TPP_CREDENTIAL_PASSWORD."""
    source = tmp_path / "tpp.yaml"
    source.write_text(
        'listen: "127.0.0.1:8080"\n'
        "upstream: {host: db.internal, port: 8443, tls: true}\n"
        "credential: {username: svc, password: ''}\n"
    )
    (tmp_path / ".env").write_text("OTHER=1\n")
    out = tmp_path / "tokenbroker.yaml"
    result = runner.invoke(main, ["import", "tpp", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "set TPP_CREDENTIAL_PASSWORD" in result.output
    assert "not mapped" not in result.output
    env = (tmp_path / ".env").read_text()
    assert env.startswith("OTHER=1\nTOKENBROKER_KEY=") and "TPP_" not in env
    written = yaml.safe_load(out.read_text())
    assert written["proxy"]["routes"][0]["upstream"] == "https://db.internal:8443"
    assert written["proxy"]["refresh_check_seconds"] == 60
    assert "health_listen" not in written["proxy"]
    assert written["providers"]["dolphindb"]["credentials"][0]["sessions"] == 10
    with open(tmp_path / ".env", "a") as file:
        file.write("TPP_CREDENTIAL_PASSWORD=pw\n")
    assert runner.invoke(main, ["check", "--config", str(out)]).exit_code == 0


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("listen: 0.0.0.0:8080\n", "upstream.host: required"),
        ("- a list\n", "not a YAML mapping"),
        (
            "listen: x\nupstream: {host: h, port: 0}\ncredential: {username: u}\n",
            "upstream.port: required",
        ),
        (
            "listen: x\nupstream: {host: h, port: 1}\ncredential: {username: u}\n"
            "token: {pool_size: many}\n",
            "token.pool_size: must be a whole number",
        ),
    ],
)
def test_a_broken_tpp_file_writes_nothing(
    tmp_path: Path, runner: CliRunner, document: str, message: str
) -> None:
    """A tpp file missing a required key or of the wrong shape exits 2 naming the key, and
    writes neither the output nor .env."""
    source = tmp_path / "tpp.yaml"
    source.write_text(document)
    result = runner.invoke(main, ["import", "tpp", str(source), "-o", str(tmp_path / "t.yaml")])
    assert result.exit_code == 2
    assert message in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tpp.yaml"]


def test_an_existing_output_is_not_overwritten(tmp_path: Path, runner: CliRunner) -> None:
    """Without --force an existing output file is left as it was."""
    source = tmp_path / "tpp.yaml"
    source.write_text(TPP_CONFIG)
    out = tmp_path / "tokenbroker.yaml"
    out.write_text("# mine\n")
    result = runner.invoke(main, ["import", "tpp", str(source), "-o", str(out)])
    assert result.exit_code != 0 and "already exists" in result.output
    assert out.read_text() == "# mine\n"
    assert not (tmp_path / ".env").exists()


def test_the_imported_config_proxies_like_tpp(
    tmp_path: Path, runner: CliRunner, auth_server: AuthorizationServer
) -> None:
    """End to end: a tpp config naming the bundled server as its DolphinDB (one account,
    pool_size 2) is imported; a proxy on the written file logs that account in twice (tpp's
    /api/login body), and a request through it reaches the upstream with one of those
    tokens, answered as that user; /metrics carries tpp's gauges."""
    host, port = auth_server.url.removeprefix("http://").rsplit(":", 1)
    source = tmp_path / "tpp.yaml"
    source.write_text(
        'listen: "127.0.0.1:0"\nhealth_listen: "127.0.0.1:0"\n'
        f"upstream: {{host: {host}, port: {port}, tls: false}}\n"
        "credential: {username: alice, password: alice-pw}\n"
        "token: {pool_size: 2, ttl_seconds: 600, refresh_check_seconds: 30}\n"
    )
    out = tmp_path / "tokenbroker.yaml"
    assert runner.invoke(main, ["import", "tpp", str(source), "-o", str(out)]).exit_code == 0
    before = auth_server.count("login")
    broker = Broker.from_config(out)
    try:
        assert broker.settings.proxy is not None
        with ServedProxy(broker, broker.settings.proxy) as proxy:
            reply = httpx.get(proxy.url + "/api/resource", timeout=10)
            text = httpx.get(proxy.health_url + "/metrics", timeout=10).text
    finally:
        broker.close()
    assert reply.status_code == 200
    assert reply.json() == {"ok": True, "subject": "alice"}
    assert auth_server.count("login") == before + 2
    logins = [r for r in auth_server.requests if r.grant == "login"][-2:]
    assert [r.json for r in logins] == [{"username": "alice", "password": "alice-pw"}] * 2
    assert "tpp_tokens_total 2.0" in text
