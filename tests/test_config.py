"""Configuration: valid files load into frozen settings; bad ones list every problem, no secrets."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from support import CLIENT_ID, CLIENT_SECRET
from tokenbroker.cli.main import main
from tokenbroker.config import (
    ClientCredentialsProvider,
    LoginProvider,
    RefreshTokenProvider,
    Settings,
    load_settings,
    parse_settings,
)
from tokenbroker.core.secret import Secret
from tokenbroker.errors import ConfigError, ConfigProblem
from tokenbroker.testing import AuthorizationServer

CS_CANARY = "CANARY_CS_5d1e0f2a"
RT_CANARY = "CANARY_RT_77b3c9d4"
PW_CANARY = "CANARY_PW_0a9e6b13"
EK_CANARY = "Q0FOQVJZX0VLX2MyZjQ4ZTAxX19fX19fX19fX19fX18="  # a valid key: CANARY_EK_c2f48e01___…
REDIS_CANARY = "CANARY_REDIS_19fa2b"
ENV_CANARY = "CANARY_ENV_3e8d1c70"


def pem(key: Any) -> str:
    """PKCS#8 PEM of an unencrypted private key."""
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data.decode()


@pytest.fixture(scope="module")
def ec_pem() -> str:
    """An EC P-256 private key in PEM."""
    return pem(ec.generate_private_key(ec.SECP256R1()))


def dedent(text: str) -> str:
    """YAML written indented inside a test."""
    return textwrap.dedent(text).lstrip("\n")


def problems_of(text: str, env: dict[str, str] | None = None, **kwargs: Any) -> list[ConfigProblem]:
    """The problems parse_settings reports for ``text`` (it must fail)."""
    with pytest.raises(ConfigError) as info:
        parse_settings(text, env or {}, **kwargs)
    return info.value.problems


def paths(problems: list[ConfigProblem]) -> list[str]:
    """The field paths of ``problems``, in order."""
    return [p.path for p in problems]


def only(problems: list[ConfigProblem], path: str) -> ConfigProblem:
    """The single problem reported at ``path``."""
    found = [p for p in problems if p.path == path]
    assert len(found) == 1, f"expected one problem at {path!r}, got {problems}"
    return found[0]


CC = {
    "grant": "client_credentials",
    "token_url": "https://idp.example.com/oauth2/token",
    "client_id": "svc",
    "client_secret": "s3cret",
}


def one_provider(**fields: Any) -> str:
    """A config with a single client-credentials provider ``p`` overriding ``fields``."""
    provider = {k: v for k, v in {**CC, **fields}.items() if v is not None}
    return yaml.safe_dump({"providers": {"p": provider}})


# -- valid configurations --------------------------------------------------------------------


FULL = dedent(
    """
    store: memory
    encryption_keys: ["${EK}"]
    defaults:
      retries: 4
      timeout_seconds: 5
      backoff_seconds: 0.25
    providers:
      api:
        grant: client_credentials
        token_url: https://idp.example.com/oauth2/token
        client_id: svc
        client_secret: ${CS}
        client_auth: client_secret_post
        scopes: [read, write]
        audience: https://api.example.com
        retries: 1
      jwt:
        grant: client_credentials
        token_url: https://idp.example.com/oauth2/token
        client_id: svc-jwt
        client_auth: private_key_jwt
        private_key: ${PK}
        assertion_audience: https://idp.example.com/
      tesla:
        grant: refresh_token
        token_url: https://auth.tesla.com/oauth2/v3/token
        client_id: ownerapi
        refresh_token: ${RT}
        scopes: [openid, offline_access]
        rotation:
          single_use: true
          reuse_grace_seconds: 86400
        default_expires_in: 28800
      dolphin:
        grant: login
        login_url: http://dolphindb.internal:8848/api/login
        token_path: data.token
        expires_in_path: data.ttl
        ttl_seconds: 600
        request:
          form: {user: "{username}", pass: "{password}"}
        credentials:
          - {username: alice, password: "${PW}"}
          - {username: bob, password: bob-pw}
    """
)


@pytest.fixture
def full_env(ec_pem: str) -> dict[str, str]:
    """Environment for FULL with a canary in every secret."""
    return {"EK": EK_CANARY, "CS": CS_CANARY, "PK": ec_pem, "RT": RT_CANARY, "PW": PW_CANARY}


def test_full_config_all_three_grants(full_env: dict[str, str]) -> None:
    """A config using every grant validates into the matching frozen provider models."""
    settings = parse_settings(FULL, full_env)
    assert set(settings.providers) == {"api", "jwt", "tesla", "dolphin"}
    api = settings.providers["api"]
    assert isinstance(api, ClientCredentialsProvider)
    assert api.client_auth == "client_secret_post"
    assert api.client_secret is not None
    assert api.client_secret.reveal() == CS_CANARY
    assert api.scopes == ("read", "write")
    assert api.audience == "https://api.example.com"
    assert api.retries == 1
    jwt_provider = settings.providers["jwt"]
    assert isinstance(jwt_provider, ClientCredentialsProvider)
    assert jwt_provider.private_key is not None
    assert (
        jwt_provider.private_key.reveal() == full_env["PK"].strip()
    )  # the PEM's final newline is stripped
    assert jwt_provider.assertion_audience == "https://idp.example.com/"
    tesla = settings.providers["tesla"]
    assert isinstance(tesla, RefreshTokenProvider)
    assert tesla.refresh_token.reveal() == RT_CANARY
    assert tesla.client_auth == "none"
    assert tesla.rotation.reuse_grace_seconds == 86400
    assert tesla.default_expires_in == 28800
    dolphin = settings.providers["dolphin"]
    assert isinstance(dolphin, LoginProvider)
    assert [c.username for c in dolphin.credentials] == ["alice", "bob"]
    assert dolphin.credentials[0].password.reveal() == PW_CANARY
    assert dolphin.request.form == {"user": "{username}", "pass": "{password}"}
    assert dolphin.request.json_body is None
    assert dolphin.token_path == "data.token"
    assert [k.reveal() for k in settings.encryption_keys] == [EK_CANARY]


def test_defaults_apply_and_overrides_stay_per_provider(full_env: dict[str, str]) -> None:
    """Omitted settings take documented defaults; a provider override does not change defaults."""
    settings = parse_settings(FULL, full_env)
    assert settings.defaults.retries == 4
    assert settings.defaults.timeout_seconds == 5
    assert settings.defaults.backoff_seconds == 0.25
    assert settings.defaults.deadline_seconds == 30.0
    assert settings.defaults.skew_seconds == 30.0
    assert settings.defaults.refresh_ahead == 0.8
    assert settings.defaults.max_response_bytes == 1 << 20
    assert settings.defaults.invalidate_cooldown_seconds == 5.0
    assert settings.defaults.max_scopes == 16
    assert settings.providers["api"].retries == 1
    assert settings.providers["jwt"].retries is None
    assert settings.providers["jwt"].timeout_seconds is None


def test_minimal_provider_defaults() -> None:
    """A minimal provider of each grant gets the documented defaults."""
    text = dedent(
        """
        providers:
          cc: {grant: client_credentials, token_url: "https://i/t", client_id: c, client_secret: s}
          rt: {grant: refresh_token, token_url: "https://i/t", client_id: c, refresh_token: r}
          db:
            grant: login
            login_url: https://db/api/login
            credentials: [{username: u, password: p}]
        """
    )
    settings = parse_settings(text, {})
    cc, rt, db = (settings.providers[n] for n in ("cc", "rt", "db"))
    assert isinstance(cc, ClientCredentialsProvider)
    assert cc.client_auth == "client_secret_basic"
    assert cc.scopes == ()
    assert cc.default_expires_in == 3600
    assert cc.required is False
    assert isinstance(rt, RefreshTokenProvider)
    assert rt.client_auth == "none"
    assert rt.rotation.single_use is True
    assert rt.rotation.reuse_grace_seconds == 0
    assert rt.reauthorization_errors == ("invalid_grant", "login_required")
    assert isinstance(db, LoginProvider)
    assert db.request.json_body == {"username": "{username}", "password": "{password}"}
    assert db.token_path == "token"
    assert db.token_type == "Bearer"
    assert db.ttl_seconds == 3600


def test_scope_bounds_and_proxy_route_scopes_are_checked() -> None:
    """max_scopes and invalidate_cooldown_seconds are range-checked; a proxy route's scope
    is stored canonical (blank as none) and a malformed one is named."""
    provider = {"grant": "client_credentials", "token_url": "https://i/t", "client_id": "c"}
    provider["client_secret"] = "s"
    route = {"prefix": "/", "upstream": "http://127.0.0.1:1", "provider": "cc", "mode": "shared"}

    def config(scope: str, **extra: Any) -> str:
        routes = [{**route, "scope": scope}]
        return yaml.safe_dump(
            {"providers": {"cc": {**provider, **extra}}, "proxy": {"routes": routes}}
        )

    settings = parse_settings(config(" write read read ", max_scopes=2), {})
    assert settings.proxy is not None and settings.proxy.routes[0].scope == "read write"
    assert parse_settings(config("  "), {}).proxy.routes[0].scope is None  # type: ignore[union-attr]
    bad = [
        (config("read\twrite"), "proxy.routes.0.scope"),
        (config("read", max_scopes=0), "providers.cc.max_scopes"),
        (
            config("read", invalidate_cooldown_seconds=-1),
            "providers.cc.invalidate_cooldown_seconds",
        ),
        (config("read", scopes=["a" * 600, "b" * 600]), "providers.cc.scopes"),
    ]
    for text, path in bad:
        with pytest.raises(ConfigError) as caught:
            parse_settings(text, {})
        assert path in [p.path for p in caught.value.problems]


def test_empty_document_gives_defaults() -> None:
    """An empty file is a valid config with no providers and default settings."""
    settings = parse_settings("", {})
    assert settings.providers == {}
    assert settings.store == "sqlite:///tokenbroker.db"
    assert settings.defaults.retries == 2


def test_settings_are_frozen(full_env: dict[str, str]) -> None:
    """The validated settings cannot be mutated."""
    settings = parse_settings(FULL, full_env)
    with pytest.raises(ValidationError):
        settings.store = "sqlite"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.defaults.retries = 9  # type: ignore[misc]


# -- interpolation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "fallback"),
        ({"ID": ""}, "fallback"),
        ({"ID": "from-env"}, "from-env"),
    ],
)
def test_default_interpolation(env: dict[str, str], expected: str) -> None:
    """${VAR:-default} uses the default when VAR is unset or empty, else VAR."""
    settings = parse_settings(one_provider(client_id="${ID:-fallback}"), env)
    assert settings.providers["p"].client_id == expected  # type: ignore[union-attr]


def test_interpolation_inside_a_string() -> None:
    """Several references inside one value are all substituted."""
    settings = parse_settings(
        one_provider(token_url="https://${HOST}:${PORT:-8443}/oauth/token"), {"HOST": "idp.local"}
    )
    assert settings.providers["p"].token_url == "https://idp.local:8443/oauth/token"  # type: ignore[union-attr]


def test_interpolated_numbers_are_coerced() -> None:
    """A number taken from the environment validates like a number written in YAML."""
    settings = parse_settings("defaults:\n  retries: ${R}\n", {"R": "5"})
    assert settings.defaults.retries == 5


def test_env_values_are_not_reinterpolated() -> None:
    """A value from the environment that looks like ${X} is taken literally (no second pass)."""
    settings = parse_settings(one_provider(client_secret="${S}"), {"S": "${OTHER}"})
    secret = settings.providers["p"].client_secret  # type: ignore[union-attr]
    assert secret is not None
    assert secret.reveal() == "${OTHER}"


def test_missing_env_vars_named_with_their_paths() -> None:
    """Every missing variable is reported by name at the field that references it."""
    text = one_provider(client_id="${MISSING_ID}", client_secret="${MISSING_SECRET}")
    problems = problems_of(text, {"UNRELATED": "x"})
    missing = {p.env_var: p for p in problems if p.env_var}
    assert set(missing) == {"MISSING_ID", "MISSING_SECRET"}
    assert missing["MISSING_ID"].path == "providers.p.client_id"
    assert missing["MISSING_SECRET"].path == "providers.p.client_secret"
    assert "MISSING_SECRET" in str(missing["MISSING_SECRET"])


# -- load_settings: files, .env, credentials_file ----------------------------------------------


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (creating parents) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


LOGIN_WITH_FILE = dedent(
    """
    providers:
      db:
        grant: login
        login_url: http://10.0.0.5:8848/api/login
        credentials_file: accounts.txt
        credentials:
          - {username: inline, password: inline-pw}
    """
)


def test_credentials_file_relative_to_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """credentials_file is read beside the config (not the cwd), skipping comments and blanks."""
    config = write(tmp_path / "etc" / "tokenbroker.yaml", LOGIN_WITH_FILE)
    write(
        tmp_path / "etc" / "accounts.txt",
        f"# accounts for db\n\nalice:{PW_CANARY}\n   \n  # indented comment\nbob:pa:ss:word\n",
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    write(elsewhere / "accounts.txt", "wrong:file\n")
    monkeypatch.chdir(elsewhere)
    settings = load_settings(config)
    db = settings.providers["db"]
    assert isinstance(db, LoginProvider)
    assert [(c.username, c.password.reveal()) for c in db.credentials] == [
        ("inline", "inline-pw"),
        ("alice", PW_CANARY),
        ("bob", "pa:ss:word"),
    ]
    assert PW_CANARY not in repr(settings)


def test_credentials_file_absolute_path(tmp_path: Path) -> None:
    """An absolute credentials_file is used as given."""
    accounts = write(tmp_path / "secrets" / "db.txt", "carol:c-pw\n")
    text = yaml.safe_dump(
        {
            "providers": {
                "db": {
                    "grant": "login",
                    "login_url": "https://db/api/login",
                    "credentials_file": str(accounts),
                }
            }
        }
    )
    settings = parse_settings(text, {}, base_dir=tmp_path / "unrelated")
    assert [c.username for c in settings.providers["db"].credentials] == ["carol"]  # type: ignore[union-attr]


def test_credentials_file_bad_lines_reported_by_number(tmp_path: Path) -> None:
    """Each malformed line is reported with its number, never its content."""
    write(
        tmp_path / "accounts.txt",
        f"# header\nalice:ok\n{PW_CANARY}\n:nouser\nnopass:\nbob:fine\n",
    )
    problems = problems_of(LOGIN_WITH_FILE, base_dir=tmp_path)
    assert [(p.path, p.message) for p in problems] == [
        ("providers.db.credentials_file", "line 3 is not username:password"),
        ("providers.db.credentials_file", "line 4 is not username:password"),
        ("providers.db.credentials_file", "line 5 is not username:password"),
    ]
    for problem in problems:
        assert PW_CANARY not in str(problem)


def test_credentials_file_missing(tmp_path: Path) -> None:
    """A credentials_file that cannot be read is a problem at that field."""
    problem = only(problems_of(LOGIN_WITH_FILE, base_dir=tmp_path), "providers.db.credentials_file")
    assert "cannot read" in problem.message


def test_credentials_file_is_a_directory(tmp_path: Path) -> None:
    """A credentials_file that is a directory is reported, not raised as OSError."""
    (tmp_path / "accounts.txt").mkdir()
    problem = only(problems_of(LOGIN_WITH_FILE, base_dir=tmp_path), "providers.db.credentials_file")
    assert "cannot read" in problem.message


def test_credentials_file_not_utf8(tmp_path: Path) -> None:
    """A credentials_file that is not UTF-8 text is a ConfigError at that field."""
    (tmp_path / "accounts.txt").write_bytes(b"alice:\xff\xfe\xfd\n")
    only(problems_of(LOGIN_WITH_FILE, base_dir=tmp_path), "providers.db.credentials_file")


def test_credentials_file_path_with_nul(tmp_path: Path) -> None:
    """A NUL byte in the credentials_file path is a ConfigError, not a ValueError."""
    text = LOGIN_WITH_FILE.replace("accounts.txt", '"acc\\0ounts.txt"')
    only(problems_of(text, base_dir=tmp_path), "providers.db.credentials_file")


def test_credentials_file_with_wrongly_typed_credentials(tmp_path: Path) -> None:
    """credentials of the wrong type beside a credentials_file is reported at credentials."""
    write(tmp_path / "accounts.txt", "alice:pw\n")
    text = LOGIN_WITH_FILE.replace(
        "credentials:\n      - {username: inline, password: inline-pw}", "credentials: 5"
    )
    assert "credentials: 5" in text
    problems = problems_of(text, base_dir=tmp_path)
    assert "providers.db.credentials" in paths(problems)


def test_duplicate_account_across_inline_and_file(tmp_path: Path) -> None:
    """An account listed inline and again in credentials_file is a duplicate."""
    write(tmp_path / "accounts.txt", "inline:other\n")
    problem = only(problems_of(LOGIN_WITH_FILE, base_dir=tmp_path), "providers.db")
    assert "twice" in problem.message


def test_dotenv_beside_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .env file beside the config provides variables the process environment lacks."""
    monkeypatch.delenv("TB_TEST_SECRET", raising=False)
    monkeypatch.delenv("TB_TEST_ID", raising=False)
    write(tmp_path / ".env", f"TB_TEST_SECRET={ENV_CANARY}\nTB_TEST_ID=from-dotenv\n")
    config = write(
        tmp_path / "tokenbroker.yaml",
        one_provider(client_id="${TB_TEST_ID}", client_secret="${TB_TEST_SECRET}"),
    )
    monkeypatch.chdir(tmp_path.parent)
    provider = load_settings(config).providers["p"]
    assert isinstance(provider, ClientCredentialsProvider)
    assert provider.client_id == "from-dotenv"
    assert provider.client_secret is not None
    assert provider.client_secret.reveal() == ENV_CANARY


def test_process_env_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable set in the process environment overrides the same one in .env."""
    monkeypatch.setenv("TB_TEST_ID", "from-process")
    monkeypatch.delenv("TB_TEST_SECRET", raising=False)
    write(tmp_path / ".env", "TB_TEST_ID=from-dotenv\nTB_TEST_SECRET=dotenv-secret\n")
    config = write(
        tmp_path / "tokenbroker.yaml",
        one_provider(client_id="${TB_TEST_ID}", client_secret="${TB_TEST_SECRET}"),
    )
    provider = load_settings(config).providers["p"]
    assert isinstance(provider, ClientCredentialsProvider)
    assert provider.client_id == "from-process"
    assert provider.client_secret is not None
    assert provider.client_secret.reveal() == "dotenv-secret"


def test_dotenv_elsewhere_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the .env beside the config is read, not one in the working directory."""
    monkeypatch.delenv("TB_TEST_ID", raising=False)
    write(tmp_path / "cwd" / ".env", "TB_TEST_ID=from-cwd\n")
    config = write(tmp_path / "etc" / "tokenbroker.yaml", one_provider(client_id="${TB_TEST_ID}"))
    monkeypatch.chdir(tmp_path / "cwd")
    problem = only(load_problems(config), "providers.p.client_id")
    assert problem.env_var == "TB_TEST_ID"


def load_problems(path: Path | str) -> list[ConfigProblem]:
    """The problems load_settings reports for ``path`` (it must fail)."""
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


def test_default_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no path, load_settings reads $TOKENBROKER_CONFIG."""
    config = write(tmp_path / "custom.yaml", "store: sqlite:///from-env.db\n")
    monkeypatch.setenv("TOKENBROKER_CONFIG", str(config))
    assert load_settings().store == f"sqlite:///{tmp_path / 'from-env.db'}"


def test_config_file_missing(tmp_path: Path) -> None:
    """A config file that does not exist is one top-level ConfigError."""
    problems = load_problems(tmp_path / "nope.yaml")
    assert paths(problems) == [""]
    assert "cannot read" in problems[0].message


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    """A config path that is a directory is a ConfigError, not an OSError."""
    assert paths(load_problems(tmp_path)) == [""]


def test_config_file_not_utf8(tmp_path: Path) -> None:
    """A config file that is not UTF-8 is a ConfigError, not a UnicodeDecodeError."""
    config = tmp_path / "tokenbroker.yaml"
    config.write_bytes(b"store: \xff\xfe\n")
    assert paths(load_problems(config)) == [""]


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/token",
        "http://127.5.6.7/token",
        "http://localhost/token",
        "http://localhost:9000/oauth/token",
        "http://[::1]:8080/token",
        "https://idp.example.com/token",
        "https://10.0.0.1/token",
    ],
)
def test_token_url_allowed(url: str) -> None:
    """https anywhere, and plain http only on loopback hosts, are accepted token URLs."""
    assert parse_settings(one_provider(token_url=url), {}).providers["p"].token_url == url  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://idp.example.com/token", "https"),
        ("http://10.0.0.1/token", "https"),
        ("http://127.0.0.1.nip.io/token", "https"),
        ("http://localhost.evil.com/token", "https"),
        ("http://0.0.0.0/token", "https"),
        ("ftp://idp.example.com/token", "absolute"),
        ("idp.example.com/token", "absolute"),
        ("https:///token", "absolute"),
        ("https://user:pw@idp.example.com/token", "credentials"),
    ],
)
def test_token_url_rejected(url: str, fragment: str) -> None:
    """Plain http to a non-loopback host, non-http schemes and userinfo are rejected."""
    problem = only(problems_of(one_provider(token_url=url)), "providers.p.token_url")
    assert fragment in problem.message
    assert "pw@" not in str(problem)


def test_login_url_may_use_http() -> None:
    """A login endpoint on a private network may use plain http (DolphinDB)."""
    text = yaml.safe_dump(
        {
            "providers": {
                "db": {
                    "grant": "login",
                    "login_url": "http://dolphindb.internal:8848/api/login",
                    "credentials": [{"username": "u", "password": "p"}],
                }
            }
        }
    )
    assert parse_settings(text, {}).providers["db"].login_url.startswith("http://")  # type: ignore[union-attr]


def test_login_url_must_be_http_url() -> None:
    """A login_url that is not an http(s) URL is rejected at its path."""
    text = yaml.safe_dump(
        {
            "providers": {
                "db": {
                    "grant": "login",
                    "login_url": "file:///etc/passwd",
                    "credentials": [{"username": "u", "password": "p"}],
                }
            }
        }
    )
    only(problems_of(text), "providers.db.login_url")


# -- problems, all at once -------------------------------------------------------------------


def test_every_problem_reported_together(ec_pem: str) -> None:
    """One run reports every problem in the file, each at its dotted path."""
    text = dedent(
        """
        bogus_top: 1
        defaults:
          retries: many
          timeout_seconds: -1
        providers:
          unknown-key:
            grant: client_credentials
            token_url: https://i/t
            client_id: c
            client_secret: s
            extra_field: 1
          wrong-type:
            grant: client_credentials
            token_url: https://i/t
            client_id: [not, a, string]
            client_secret: s
          plain-http:
            grant: client_credentials
            token_url: http://idp.example.com/token
            client_id: c
            client_secret: s
          missing-env:
            grant: client_credentials
            token_url: https://i/t
            client_id: ${NOT_SET}
            client_secret: s
          no-grant:
            token_url: https://i/t
          bad-grant:
            grant: password
          basic-no-secret:
            grant: client_credentials
            token_url: https://i/t
            client_id: c
          jwt-no-key:
            grant: client_credentials
            token_url: https://i/t
            client_id: c
            client_auth: private_key_jwt
          bad-pem:
            grant: client_credentials
            token_url: https://i/t
            client_id: c
            client_auth: private_key_jwt
            private_key: "-----BEGIN PRIVATE KEY-----\\nAAAA\\n-----END PRIVATE KEY-----\\n"
          dup-account:
            grant: login
            login_url: http://db/api/login
            credentials:
              - {username: a, password: p}
              - {username: a, password: q}
          Bad Name:
            grant: client_credentials
            token_url: https://i/t
            client_id: c
            client_secret: s
        """
    )
    problems = problems_of(text)
    by_path = {p.path: p for p in problems}
    expected = {
        "bogus_top": "not a known field",
        "defaults.retries": "integer",
        "defaults.timeout_seconds": "greater than 0",
        "providers.unknown-key.extra_field": "not a known field",
        "providers.wrong-type.client_id": "string",
        "providers.plain-http.token_url": "https",
        "providers.missing-env.client_id": "NOT_SET",
        "providers.no-grant": "grant is required",
        "providers.bad-grant": "grant must be one of",
        "providers.basic-no-secret": "needs client_secret",
        "providers.jwt-no-key": "needs private_key",
        "providers.bad-pem": "not an unencrypted PEM",
        "providers.dup-account": "twice",
        "providers.Bad Name": "provider name",
    }
    for path, fragment in expected.items():
        assert path in by_path, f"no problem reported at {path!r}: {problems}"
        assert fragment in by_path[path].message, by_path[path]
    assert len(problems) == len(expected), problems
    message = str(ConfigError(problems))
    assert f"({len(expected)} problem(s))" in message
    for path in expected:
        assert path in message


@pytest.mark.parametrize(
    "name",
    [
        "Upper",
        "has space",
        "-leading-dash",
        "_leading",
        pytest.param("x" * 65, id="65-chars"),
        "dot.ted",
        "é",
    ],
)
def test_bad_provider_name(name: str) -> None:
    """Provider names outside 1-64 of [a-z0-9_-] (starting alphanumeric) are rejected."""
    text = yaml.safe_dump({"providers": {name: dict(CC)}})
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert "provider name" in problems[0].message
    assert problems[0].path == f"providers.{name}"


def test_good_provider_names() -> None:
    """Lower-case names with digits, '_' and '-' up to 64 characters are accepted."""
    names = ["a", "0", "tdx", "dolphin_db-2", "x" * 64]
    text = yaml.safe_dump({"providers": {n: dict(CC) for n in names}})
    assert sorted(parse_settings(text, {}).providers) == sorted(names)


@pytest.mark.parametrize(
    ("fields", "path", "fragment"),
    [
        ({"retries": 11}, "providers.p.retries", "less than or equal to 10"),
        ({"refresh_ahead": 0}, "providers.p.refresh_ahead", "greater than 0"),
        ({"client_auth": "magic"}, "providers.p.client_auth", "client_secret_basic"),
        ({"signing_alg": "HS256"}, "providers.p.signing_alg", "RS256"),
        ({"scopes": ["ok", "has space"]}, "providers.p.scopes", "scope-token"),
        ({"scopes": ['quote"']}, "providers.p.scopes", "scope-token"),
        ({"client_id": " "}, "providers.p.client_id", "is blank"),
        ({"required": "perhaps"}, "providers.p.required", "boolean"),
    ],
)
def test_field_problems_at_their_paths(fields: dict[str, Any], path: str, fragment: str) -> None:
    """Out-of-range, wrong-literal and malformed fields are each reported at their own path."""
    problem = only(problems_of(one_provider(**fields)), path)
    assert fragment in problem.message


@pytest.mark.parametrize("value", [["x"], {"k": "v"}, 5, True])
@pytest.mark.parametrize("field", ["client_secret", "private_key"])
def test_wrong_typed_secret_reported_once_at_its_path(value: Any, field: str) -> None:
    """A Secret field given a non-string is one problem at the field's own dotted path."""
    problems = problems_of(one_provider(**{field: value}))
    assert paths(problems) == [f"providers.p.{field}"], problems
    assert "string" in problems[0].message


def test_client_secret_post_without_secret() -> None:
    """client_secret_post without client_secret is rejected at the provider."""
    problems = problems_of(one_provider(client_auth="client_secret_post", client_secret=None))
    assert "needs client_secret" in only(problems, "providers.p").message


def test_login_without_accounts() -> None:
    """A login provider with no accounts is rejected."""
    text = yaml.safe_dump({"providers": {"db": {"grant": "login", "login_url": "https://d/l"}}})
    assert "at least one account" in only(problems_of(text), "providers.db").message


def test_login_request_needs_exactly_one_kind() -> None:
    """A login request template must give exactly one of json and form."""
    base = {
        "grant": "login",
        "login_url": "https://d/l",
        "credentials": [{"username": "u", "password": "p"}],
    }
    both = yaml.safe_dump({"providers": {"db": {**base, "request": {"json": {}, "form": {}}}}})
    neither = yaml.safe_dump({"providers": {"db": {**base, "request": {}}}})
    for text in (both, neither):
        assert "exactly one" in only(problems_of(text), "providers.db.request").message


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: dsa.generate_private_key(2048), id="dsa"),
        pytest.param(lambda: ed448.Ed448PrivateKey.generate(), id="ed448"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="ec-p384"),
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), id="rsa-1024"),
    ],
)
def test_private_key_jwt_unusable_key_rejected(make_key: Any) -> None:
    """A PEM key that private_key_jwt cannot sign with is rejected at load, not at first fetch."""
    text = one_provider(client_auth="private_key_jwt", client_secret=None, private_key="${PK}")
    only(problems_of(text, {"PK": pem(make_key())}), "providers.p")


def test_private_key_jwt_alg_must_fit_key(ec_pem: str) -> None:
    """signing_alg must match the key type (RS256 with an EC key is rejected at load)."""
    text = one_provider(
        client_auth="private_key_jwt", client_secret=None, private_key="${PK}", signing_alg="RS256"
    )
    only(problems_of(text, {"PK": ec_pem}), "providers.p")


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), id="ec-p256"),
        pytest.param(lambda: rsa.generate_private_key(65537, 2048), id="rsa"),
        pytest.param(lambda: ed25519.Ed25519PrivateKey.generate(), id="ed25519"),
    ],
)
def test_private_key_jwt_usable_keys_accepted(make_key: Any) -> None:
    """RSA, EC P-256 and Ed25519 PEM keys are accepted for private_key_jwt."""
    text = one_provider(client_auth="private_key_jwt", client_secret=None, private_key="${PK}")
    provider = parse_settings(text, {"PK": pem(make_key())}).providers["p"]
    assert provider.private_key is not None  # type: ignore[union-attr]


def test_encrypted_pem_rejected() -> None:
    """A passphrase-protected PEM is rejected (the broker has no passphrase)."""
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ).decode()
    text = one_provider(client_auth="private_key_jwt", client_secret=None, private_key="${PK}")
    assert "PEM" in only(problems_of(text, {"PK": encrypted}), "providers.p").message


@pytest.mark.parametrize(
    "text",
    [
        "providers: [\n",
        "a: b: c\n",
        "key: 'unterminated\n",
        "\t- tab indented\n",
        "a: 1\na: [\n",
        "x: " + "[" * 5000 + "]" * 5000 + "\n",
    ],
)
def test_invalid_yaml(text: str) -> None:
    """Text that is not YAML (including absurdly deep nesting) is one top-level problem."""
    problems = problems_of(text)
    assert paths(problems) == [""]
    assert "not valid YAML" in problems[0].message


@pytest.mark.parametrize(
    "text",
    ["server: &loop [*loop]\n", "server: &loop {again: *loop}\n", "providers: &p {p: *p}\n"],
)
def test_self_referencing_yaml_alias(text: str) -> None:
    """A YAML alias that contains itself is a top-level problem, not a RecursionError."""
    assert paths(problems_of(text)) == [""]


def alias_bomb(levels: int) -> str:
    """A 'billion laughs' document: each level holds nine aliases of the one below."""
    lines = ["  l0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "server:\n" + "\n".join(lines) + "\n"


def test_yaml_alias_bomb_refused_quickly() -> None:
    """A small file whose aliases expand to millions of nodes is refused without expanding it."""
    text = alias_bomb(7)
    assert len(text) < 1024
    started = time.monotonic()
    problems = problems_of(text)
    assert time.monotonic() - started < 1.0
    assert paths(problems) == [""]


def test_yaml_anchors_and_merge_keys_still_work() -> None:
    """Ordinary anchors and merge keys (shared provider settings) are accepted."""
    text = dedent(
        """
        providers:
          a: &base {grant: client_credentials, token_url: "https://i/t", client_id: c, client_secret: s}
          b: {<<: *base, client_id: d}
        """
    )
    providers = parse_settings(text, {}).providers
    assert [providers[n].client_id for n in ("a", "b")] == ["c", "d"]  # type: ignore[union-attr]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", "true\n"])
def test_document_must_be_a_mapping(text: str) -> None:
    """A YAML document that is not a mapping is rejected at the top level."""
    problems = problems_of(text)
    assert [(p.path, p.message) for p in problems] == [("", "the document must be a mapping")]


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("providers: [1, 2]\n", "providers"),
        ("providers:\n  p: 5\n", "providers.p"),
        ("defaults: 3\n", "defaults"),
        ("encryption_keys: {a: 1}\n", "encryption_keys"),
    ],
)
def test_wrong_container_types(text: str, path: str) -> None:
    """A list or scalar where a mapping belongs is reported at its path."""
    assert path in paths(problems_of(text))


# -- secrets never leak ----------------------------------------------------------------------


def assert_no_canary(text: str, *canaries: str) -> None:
    """Fail if any canary occurs in ``text``."""
    for canary in canaries or (
        CS_CANARY,
        RT_CANARY,
        PW_CANARY,
        EK_CANARY,
        REDIS_CANARY,
        ENV_CANARY,
    ):
        assert canary not in text, f"{canary} leaked into {text!r}"


def test_secrets_absent_from_repr(full_env: dict[str, str]) -> None:
    """repr, str and dumps of valid settings contain no secret value (D1)."""
    settings = parse_settings(FULL, full_env)
    pk_body = full_env["PK"].splitlines()[1]
    for text in (
        repr(settings),
        str(settings),
        repr(settings.providers),
        str(settings.model_dump()),
        settings.model_dump_json(),
    ):
        assert_no_canary(text)
        assert pk_body not in text


def test_redis_url_password_not_in_repr() -> None:
    """A password inside the redis URL does not appear in repr(settings) (D1)."""
    settings = parse_settings("redis: redis://:${RP}@cache:6379/0\n", {"RP": REDIS_CANARY})
    assert_no_canary(repr(settings), REDIS_CANARY)
    assert_no_canary(settings.model_dump_json(), REDIS_CANARY)


def test_secrets_absent_from_errors_in_a_broken_file(tmp_path: Path) -> None:
    """A file with secrets and other errors reports the errors without any secret value."""
    write(tmp_path / "accounts.txt", f"{PW_CANARY}\nbob:{PW_CANARY}\n")
    text = dedent(
        f"""
        encryption_keys: ["{EK_CANARY}", {{nested: "{EK_CANARY}"}}]
        unknown: "{CS_CANARY}"
        providers:
          api:
            grant: client_credentials
            token_url: http://idp.example.com/token?secret={CS_CANARY}
            client_id: svc
            client_secret: {CS_CANARY}
            client_auth: "{CS_CANARY}"
            retries: "{CS_CANARY}"
            scopes: ["{CS_CANARY} with space"]
          typed:
            grant: client_credentials
            token_url: https://user:{CS_CANARY}@idp.example.com/token
            client_id: {{value: "{CS_CANARY}"}}
            client_secret: ["{CS_CANARY}"]
          rt:
            grant: "{RT_CANARY}"
            refresh_token: {RT_CANARY}
          rt2:
            grant: refresh_token
            token_url: https://i/t
            client_id: c
            refresh_token: {{token: "{RT_CANARY}"}}
            rotation: "{RT_CANARY}"
          jwt:
            grant: client_credentials
            token_url: https://i/t
            client_id: c
            client_auth: private_key_jwt
            private_key: "-----BEGIN PRIVATE KEY-----\\n{CS_CANARY}\\n-----END PRIVATE KEY-----\\n"
          db:
            grant: login
            login_url: https://db/api/login
            credentials_file: accounts.txt
            credentials:
              - {{username: a, password: ["{PW_CANARY}"]}}
              - {{username: b, password: "{PW_CANARY}", pin: "{PW_CANARY}"}}
            ttl_seconds: "{PW_CANARY}"
        """
    )
    with pytest.raises(ConfigError) as info:
        parse_settings(text, {}, base_dir=tmp_path)
    error = info.value
    assert len(error.problems) >= 10
    for rendered in (str(error), repr(error), repr(error.problems), str(error.args)):
        assert_no_canary(rendered)


def test_secret_from_env_absent_from_errors() -> None:
    """A secret interpolated from the environment stays out of the error for the same file."""
    text = one_provider(client_secret="${S}", client_id="${S}", retries="${S}", bogus="${S}")
    with pytest.raises(ConfigError) as info:
        parse_settings(text, {"S": ENV_CANARY})
    assert_no_canary(str(info.value), ENV_CANARY)
    assert_no_canary(repr(info.value.problems), ENV_CANARY)


def test_secret_in_invalid_yaml_absent_from_error() -> None:
    """The YAML error names a line, not the text around it."""
    text = f"providers:\n  p:\n    client_secret: {CS_CANARY}\n    bad: [\n"
    with pytest.raises(ConfigError) as info:
        parse_settings(text, {})
    assert_no_canary(str(info.value), CS_CANARY)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_validation_error_not_chained() -> None:
    """The pydantic error (which holds input values) is not chained onto ConfigError."""
    with pytest.raises(ConfigError) as info:
        parse_settings(one_provider(client_secret=[CS_CANARY]), {})
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# -- fuzz ------------------------------------------------------------------------------------

KNOWN_KEYS = [
    "store",
    "redis",
    "encryption_keys",
    "defaults",
    "providers",
    "retries",
    "grant",
    "client_credentials",
    "refresh_token",
    "login",
    "token_url",
    "login_url",
    "client_id",
    "client_secret",
    "client_auth",
    "private_key",
    "credentials",
    "credentials_file",
    "username",
    "password",
    "request",
    "json",
    "form",
    "rotation",
    "scopes",
    "p",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(
        ["https://i/t", "http://1.2.3.4/t", "${X}", "${Y:-d}", "private_key_jwt", "a:b", "\x00"]
    )
)
KEYS = st.sampled_from(KNOWN_KEYS) | st.text(max_size=10) | st.integers()
TREES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(tree=st.dictionaries(KEYS, TREES, max_size=5))
def test_fuzz_structured_config(tree: dict[Any, Any], tmp_path: Path) -> None:
    """Random nested mappings dumped to YAML yield Settings or ConfigError, nothing else."""
    text = yaml.safe_dump(tree, allow_unicode=True)
    try:
        result = parse_settings(text, {"X": "x-value"}, base_dir=tmp_path)
    except ConfigError as error:
        assert error.problems
        assert all(isinstance(p.path, str) for p in error.problems)
    else:
        assert isinstance(result, Settings)


YAMLISH = "ab:-[]{}\"'\n #&*!|>%@`,?$\\\t0x."


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(alphabet=st.sampled_from(list(YAMLISH))) | st.text())
def test_fuzz_yamlish_text(text: str) -> None:
    """Random YAML-ish text yields Settings or ConfigError, nothing else."""
    try:
        result = parse_settings(text, {})
    except ConfigError as error:
        assert error.problems
    else:
        assert isinstance(result, Settings)


def test_secret_type_in_settings(full_env: dict[str, str]) -> None:
    """Every secret-bearing field is a Secret, so it cannot be logged by accident."""
    settings = parse_settings(FULL, full_env)
    api, tesla, dolphin = (settings.providers[n] for n in ("api", "tesla", "dolphin"))
    assert isinstance(api.client_secret, Secret)  # type: ignore[union-attr]
    assert isinstance(tesla.refresh_token, Secret)  # type: ignore[union-attr]
    assert all(isinstance(c.password, Secret) for c in dolphin.credentials)  # type: ignore[union-attr]
    assert all(isinstance(k, Secret) for k in settings.encryption_keys)


# -- every section typed, every problem in one pass (operator experience, item 1) -----------

DIGEST = "ab" * 32


@pytest.mark.parametrize(
    ("section", "path", "words"),
    [
        ({"listen": "8750"}, "server.listen", "HOST:PORT"),
        ({"listen": "127.0.0.1:99999"}, "server.listen", "HOST:PORT"),
        ({"rate_limit": "lots"}, "server.rate_limit", "50/second"),
        ({"rate_limit": "10/second;100/minute"}, "server.rate_limit", "50/second"),
        ({"cors_origins": "https://app.example"}, "server.cors_origins", "must be a list"),
        ({"cors_origins": ["https://app.example/"]}, "server.cors_origins.0", "origin"),
        ({"lisen": "127.0.0.1:1"}, "server.lisen", "did you mean 'listen'"),
    ],
)
def test_server_section_is_typed(section: dict[str, Any], path: str, words: str) -> None:
    """A bad server.listen, rate_limit or cors_origins, or a misspelt server key, is refused by
    parse_settings at its field path (serve would otherwise crash on it, or ignore it)."""
    problem = only(problems_of(yaml.safe_dump({"server": section})), path)
    assert words in problem.message


@pytest.mark.parametrize("field", ["client_body_timeout_seconds", "client_request_timeout_seconds"])
@pytest.mark.parametrize(
    ("value", "words"),
    [
        (0, "greater than 0"),
        (-1, "greater than 0"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (86_401, "less than or equal to 86400"),
        ("soon", "valid number"),
    ],
)
def test_server_request_timeouts_are_checked(field: str, value: object, words: str) -> None:
    """The API's body-silence and whole-request bounds must be finite seconds in (0, 1 day]
    (a timer cannot be armed for never); the problem names the field."""
    problem = only(problems_of(yaml.safe_dump({"server": {field: value}})), f"server.{field}")
    assert words in problem.message


def test_server_request_timeouts_have_defaults_and_can_be_set() -> None:
    """By default a body may be silent 10 s and a whole request take 120 s; both can be set."""
    server = parse_settings("", {}).server
    assert (server.client_body_timeout_seconds, server.client_request_timeout_seconds) == (10, 120)
    section = {"client_body_timeout_seconds": 2.5, "client_request_timeout_seconds": 30}
    server = parse_settings(yaml.safe_dump({"server": section}), {}).server
    assert (server.client_body_timeout_seconds, server.client_request_timeout_seconds) == (2.5, 30)


@pytest.mark.parametrize(
    ("section", "path", "words"),
    [
        ({"log_level": "loud"}, "telemetry.log_level", "'debug', 'info', 'warning' or 'error'"),
        ({"log_format": "xml"}, "telemetry.log_format", "'json' or 'text'"),
        ({"log_levle": "info"}, "telemetry.log_levle", "did you mean 'log_level'"),
    ],
)
def test_telemetry_section_is_typed(section: dict[str, Any], path: str, words: str) -> None:
    """A bad telemetry.log_level or log_format, or a misspelt key, is refused at its path."""
    problem = only(problems_of(yaml.safe_dump({"telemetry": section})), path)
    assert words in problem.message


def test_telemetry_level_is_case_insensitive() -> None:
    """log_level INFO (which worked before it was typed) still works."""
    settings = parse_settings("telemetry: {log_level: INFO, log_format: text}\n", {})
    assert (settings.telemetry.log_level, settings.telemetry.log_format) == ("info", "text")


@pytest.mark.parametrize(
    ("consumer", "path", "words"),
    [
        ({"api_key_sha256": CS_CANARY, "allow": ["p"]}, "consumers.etl.api_key_sha256", "64 hex"),
        ({"allow": ["p"]}, "consumers.etl.api_key_sha256", "is required"),
        ({"api_key_sha256": DIGEST, "allow": ["nope"]}, "consumers.etl.allow.0", "no provider"),
        (
            {"api_key_sha256": DIGEST, "allow": ["p:bad\\scope"]},
            "consumers.etl.allow.0",
            "PROVIDER:SCOPE",
        ),
        ({"api_key_sha256": DIGEST, "allow": "p"}, "consumers.etl.allow", "must be a list"),
        ({"api_key_sha256": DIGEST, "alow": ["p"]}, "consumers.etl.alow", "did you mean 'allow'"),
    ],
)
def test_consumers_section_is_typed(consumer: dict[str, Any], path: str, words: str) -> None:
    """A consumer with a bad key digest, an unknown provider, a bad scope rule or a misspelt
    field is refused at its path, without echoing the value."""
    config = yaml.safe_load(one_provider())
    config["consumers"] = {"etl": consumer}
    error = problems_of(yaml.safe_dump(config))
    assert words in only(error, path).message
    assert_no_canary(repr(error), CS_CANARY)


def test_consumer_names_are_checked() -> None:
    """A consumer name the store would refuse is refused in the config too."""
    config = {"consumers": {"has space": {"api_key_sha256": DIGEST}}}
    assert paths(problems_of(yaml.safe_dump(config))) == ["consumers.has space"]


def test_typed_sections_keep_their_values() -> None:
    """Valid server, telemetry and consumers sections come back typed, digests lower-cased."""
    config = yaml.safe_load(one_provider())
    config |= {
        "server": {"listen": "[::1]:0", "rate_limit": "50 per 2 seconds", "cors_origins": ["*"]},
        "telemetry": {"log_level": "debug", "log_format": "text"},
        "consumers": {"etl": {"api_key_sha256": DIGEST.upper(), "allow": ["p", "p:read write"]}},
    }
    settings = parse_settings(yaml.safe_dump(config), {})
    assert settings.server.listen == "[::1]:0"
    assert settings.server.cors_origins == ("*",)
    assert settings.telemetry.log_level == "debug"
    assert settings.consumers["etl"].api_key_sha256 == DIGEST
    assert settings.consumers["etl"].allow == ("p", "p:read write")
    assert parse_settings("", {}).server.listen == "127.0.0.1:8750"


@pytest.mark.parametrize(
    "limit", ["1/second", "50/second", "50 per 2 seconds", "10/Minute", " 5 / hour ", "1/day"]
)
def test_rate_limits_accepted_are_the_ones_limits_parses(limit: str) -> None:
    """Every rate_limit the config accepts is one the `limits` library parses to that rate."""
    from limits import parse

    settings = parse_settings(yaml.safe_dump({"server": {"rate_limit": limit}}), {})
    assert settings.server.rate_limit == limit
    assert parse(limit).amount >= 1


@pytest.mark.parametrize("position", [0, 1])
def test_encryption_keys_must_be_32_bytes(position: int) -> None:
    """A malformed encryption key is refused at encryption_keys.N, its value never shown."""
    keys = [EK_CANARY, EK_CANARY]
    keys[position] = "CANARY_not_a_key"
    problems = problems_of(yaml.safe_dump({"encryption_keys": keys}))
    assert "32 bytes" in only(problems, f"encryption_keys.{position}").message
    assert_no_canary(repr(problems), "CANARY_not_a_key", EK_CANARY)


def test_lease_below_twice_the_deadline_is_refused() -> None:
    """lease_seconds below 2 × deadline + 2 is refused (it used to be raised silently), for the
    default deadline and for a provider's own deadline."""
    defaults = problems_of("defaults: {deadline_seconds: 10, lease_seconds: 21}\n")
    assert "at least 22" in only(defaults, "defaults.lease_seconds").message
    text = one_provider(deadline_seconds=40).replace(
        "providers:", "defaults: {lease_seconds: 70}\nproviders:"
    )
    message = only(problems_of(text), "providers.p.deadline_seconds").message
    assert "defaults.lease_seconds" in message and "82" in message
    assert parse_settings("defaults: {deadline_seconds: 10, lease_seconds: 22}\n", {})


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("store: memory\nstore: sqlite:///x.db\n", "store", 2),
        ("server:\n  listen: a:1\n  cors_origins: []\n  listen: b:2\n", "listen", 4),
    ],
)
def test_duplicate_yaml_keys_are_refused(text: str, key: str, line: int) -> None:
    """A key given twice in one mapping is an error naming the key and its line (YAML would
    silently keep the last one)."""
    (problem,) = problems_of(text)
    assert f"'{key}'" in problem.message and f"line {line}" in problem.message


def test_yaml_errors_say_why_and_where() -> None:
    """A YAML syntax error gives the parser's reason with its line and column."""
    (problem,) = problems_of("store: memory\nproviders:\n\tp: 1\n")
    assert "found character '\\t' that cannot start any token" in problem.message
    assert "line 3, column 1" in problem.message


def test_every_problem_is_listed_in_one_pass() -> None:
    """Missing variables, bad fields in every section and cross-field problems are all
    reported together by one parse."""
    text = dedent(
        """
        encryption_keys: [short]
        defaults: {deadline_seconds: 10, lease_seconds: 5}
        providers:
          p: {grant: client_credentials, token_url: "https://i/t", client_id: c, client_secret: "${NOPE}"}
        server: {listen: nowhere, cors_origins: x}
        telemetry: {log_level: loud}
        consumers:
          etl: {api_key_sha256: "12", allow: [ghost]}
        """
    )
    found = paths(problems_of(text))
    for path in (
        "encryption_keys.0",
        "defaults.lease_seconds",
        "providers.p.client_secret",
        "server.listen",
        "server.cors_origins",
        "telemetry.log_level",
        "consumers.etl.api_key_sha256",
        "consumers.etl.allow.0",
    ):
        assert path in found, found


def test_unused_settings_are_warnings() -> None:
    """telemetry.otlp_endpoint loads, but config_warnings says nothing reads it yet; redis is
    used (its extra is installed here), so it is no warning; the redis URL is never shown."""
    from tokenbroker.config import config_warnings

    text = "redis: redis://:${RP}@cache:6379/0\ntelemetry: {otlp_endpoint: http://otel:4317}\n"
    warnings = config_warnings(parse_settings(text, {"RP": REDIS_CANARY}))
    assert paths(warnings) == ["telemetry.otlp_endpoint"]
    assert all("not used" in w.message for w in warnings)
    assert_no_canary(repr(warnings), REDIS_CANARY)
    assert config_warnings(parse_settings("", {})) == []


def test_typed_sections_still_read_like_mappings() -> None:
    """Code written when server, telemetry and consumers were dicts (`.get(name)`) still works."""
    config = yaml.safe_load(one_provider())
    config |= {
        "server": {"listen": "127.0.0.1:9"},
        "consumers": {"etl": {"api_key_sha256": DIGEST, "allow": ["p"]}},
    }
    settings = parse_settings(yaml.safe_dump(config), {})
    assert settings.server.get("listen") == "127.0.0.1:9"
    assert settings.server.get("rate_limit") is None
    assert settings.server.get("no_such_field", 5) == 5
    assert settings.telemetry.get("log_format") == "json"
    assert settings.consumers["etl"].get("allow") == ("p",)


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    """`server.trusted_proxies` takes IP addresses and CIDR networks; anything else (a host
    name, `*`, a network with host bits, a non-list) is a problem at `server.trusted_proxies`,
    without the value."""
    ok = parse_settings(
        yaml.safe_dump({"store": "memory", "server": {"trusted_proxies": ["10.0.0.0/8", "::1"]}}),
        {},
    )
    assert ok.server.trusted_proxies == ("10.0.0.0/8", "::1")
    for bad in (["proxy.internal"], ["*"], ["10.0.0.1/8"], [7], "10.0.0.1"):
        text = yaml.safe_dump({"store": "memory", "server": {"trusted_proxies": bad}})
        [problem] = [p for p in problems_of(text) if p.path.startswith("server.trusted_proxies")]
        assert "proxy.internal" not in problem.message


def rt_provider(**fields: Any) -> str:
    """A config with a single refresh-token provider ``p`` overriding ``fields``."""
    provider = {
        "grant": "refresh_token",
        "token_url": "https://idp.example.com/oauth2/token",
        "client_id": "app",
        "refresh_token": "seed",
        **fields,
    }
    return yaml.safe_dump({"providers": {"p": provider}})


def test_refresh_token_client_auth_follows_the_configured_credentials(ec_pem: str) -> None:
    """Without client_auth a refresh_token provider sends what it has: client_secret →
    client_secret_basic, private_key → private_key_jwt, neither → none; an explicit choice wins."""
    cases = [
        ({}, "none"),
        ({"client_secret": "s"}, "client_secret_basic"),
        ({"private_key": ec_pem}, "private_key_jwt"),
        ({"client_secret": "s", "client_auth": "client_secret_post"}, "client_secret_post"),
        ({"client_secret": "${UNSET:-}"}, "none"),
    ]
    for fields, expected in cases:
        provider = parse_settings(rt_provider(**fields), {}).providers["p"]
        assert provider.client_auth == expected, fields


@pytest.mark.parametrize("grant", ["client_credentials", "refresh_token"])
@pytest.mark.parametrize("field", ["client_secret", "private_key"])
def test_client_auth_none_with_credentials_is_rejected(grant: str, field: str, ec_pem: str) -> None:
    """client_auth none with a client_secret or private_key is a config error: that credential
    would never be sent (a confidential client would fail with invalid_client)."""
    value = ec_pem if field == "private_key" else "s3cret"
    fields = {"client_auth": "none", field: value}
    if grant == "refresh_token":
        text = rt_provider(**fields)
    else:
        text = one_provider(**{"client_secret": None, **fields})
    problem = only(problems_of(text), "providers.p")
    assert "client_auth none" in problem.message and field in problem.message
    assert "s3cret" not in problem.message


def test_consumer_subject_and_delegation_rules() -> None:
    """A consumer's `subject` is kept (default None: its name); a malformed one, a delegate:
    rule naming an unknown provider, and a provider named like a permission word are refused
    at their fields."""
    digest = "a" * 64
    svc = {
        "grant": "client_credentials",
        "token_url": "https://idp.example/t",
        "client_id": "c",
        "client_secret": "s",
    }

    def config(consumer: dict[str, Any], providers: dict[str, Any] | None = None) -> str:
        return yaml.safe_dump(
            {
                "providers": providers or {"svc": svc},
                "consumers": {"web": {"api_key_sha256": digest, **consumer}},
            }
        )

    settings = parse_settings(config({"allow": ["delegate:svc"], "subject": "portal@x"}), {})
    assert settings.consumers["web"].subject == "portal@x"
    assert (
        parse_settings(config({"allow": ["delegate-as:svc"]}), {}).consumers["web"].subject is None
    )
    assert (
        "visible ASCII"
        in only(problems_of(config({"subject": "a b"})), "consumers.web.subject").message
    )
    assert (
        "nope"
        in only(problems_of(config({"allow": ["delegate:nope"]})), "consumers.web.allow.0").message
    )
    assert paths(problems_of(config({}, {"delegate": svc}))) == ["providers"]


def pasted_config_text(token_url: str) -> str:
    """A TDX-style config whose client id and secret come from ``${VAR}`` (memory store)."""
    return dedent(f"""
        store: memory
        providers:
          tdx:
            grant: client_credentials
            token_url: {token_url}
            client_id: ${{TDX_CLIENT_ID}}
            client_secret: ${{TDX_CLIENT_SECRET}}
            scopes: [read]
        """)


def pasted_config(tmp_path: Path, token_url: str) -> Path:
    """:func:`pasted_config_text` written to ``tmp_path/tokenbroker.yaml``."""
    path = tmp_path / "tokenbroker.yaml"
    path.write_text(pasted_config_text(token_url))
    return path


def test_pasted_credentials_are_stripped_and_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth_server: AuthorizationServer
) -> None:
    """A client id from the environment and a secret from .env, each pasted with whitespace and
    a line break, are stripped: the token request with them succeeds."""
    path = pasted_config(tmp_path, auth_server.token_url)
    (tmp_path / ".env").write_text(f'TDX_CLIENT_SECRET="  {CLIENT_SECRET}\\r\\n"\n')
    monkeypatch.setenv("TDX_CLIENT_ID", f"{CLIENT_ID}\n")
    monkeypatch.delenv("TDX_CLIENT_SECRET", raising=False)
    settings = load_settings(path)
    provider = settings.providers["tdx"]
    assert isinstance(provider, ClientCredentialsProvider)
    assert provider.client_id == CLIENT_ID
    assert provider.client_secret is not None and provider.client_secret.reveal() == CLIENT_SECRET
    result = CliRunner().invoke(main, ["token", "tdx", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == auth_server.issued_access_tokens[-1]


def test_check_names_each_stripped_variable_never_its_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check (exit 0) says which variable it stripped and for which field, without the value;
    a variable that needed no stripping is not mentioned."""
    path = pasted_config(tmp_path, "https://idp.example/token")
    monkeypatch.setenv("TDX_CLIENT_ID", "tdx-client")
    monkeypatch.setenv("TDX_CLIENT_SECRET", f"{CS_CANARY}\n")
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert notes == [
        "warning: providers.tdx.client_secret: the value of TDX_CLIENT_SECRET had surrounding "
        "whitespace or a newline, which was stripped"
    ]
    assert CS_CANARY not in result.output


@pytest.mark.parametrize("value", ["", "  ", "\n", " \r\n\t"])
def test_a_blank_client_id_from_the_environment_is_a_config_error(value: str) -> None:
    """A client id variable that is empty or only whitespace fails loading at the field, naming
    the variable (after stripping, nothing would be sent)."""
    text = pasted_config_text("https://idp.example/token")
    env = {"TDX_CLIENT_ID": value, "TDX_CLIENT_SECRET": CS_CANARY}
    problem = only(problems_of(text, env), "providers.tdx.client_id")
    assert problem.message == (
        "is blank (environment variable TDX_CLIENT_ID is empty or only whitespace)"
    )
    assert problem.env_var == "TDX_CLIENT_ID"


def test_blank_credentials_are_errors_but_an_explicit_empty_default_is_no_secret() -> None:
    """A blank refresh token or account password is an error, and so is a blank secret taken
    from a variable; ``${VAR:-}`` (the documented "no secret") still means none."""
    blank_env = {"BLANK": " \n"}
    rt = problems_of(rt_provider(refresh_token="${BLANK}"), blank_env)
    assert only(rt, "providers.p.refresh_token").env_var == "BLANK"
    secret = problems_of(rt_provider(client_secret="${BLANK}"), blank_env)
    assert only(secret, "providers.p.client_secret").message.startswith("is blank")
    account = dedent("""
        providers:
          db:
            grant: login
            login_url: https://db.example/api/login
            token_path: data.token
            credentials: [{username: alice, password: "  "}]
        """)
    assert only(problems_of(account), "providers.db.credentials.0.password").message == "is blank"
    provider = parse_settings(rt_provider(client_secret="${UNSET:-}"), {}).providers["p"]
    assert isinstance(provider, RefreshTokenProvider)
    assert not provider.client_secret and provider.client_auth == "none"
