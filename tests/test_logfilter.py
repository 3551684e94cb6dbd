"""telemetry.log_filter (tpp's RUST_LOG-style filter): per-logger levels in a real
`tokenbroker serve` with a pool proxy, the TOKENBROKER_LOG_FILTER override, and clear config
errors naming the bad part."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from support import free_port, login, serve_process
from tokenbroker import parse_settings
from tokenbroker.config.logfilter import parse_log_filter
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.errors import ConfigError
from tokenbroker.testing import AuthorizationServer, RecordingUpstream

KEY = new_key()
#: A debug line of tokenbroker.proxy (once per pool, when it is warmed).
PROXY_DEBUG = "DEBUG tokenbroker.proxy pool warmed provider=db accounts=2 failed=0"
#: A debug line of another logger: the API's per-request access line.
ACCESS_DEBUG = "DEBUG tokenbroker.access request id="


def _serve(tmp_path: Path, auth_server: AuthorizationServer, telemetry: dict[str, Any]) -> str:
    """Run `tokenbroker serve` with a pool proxy and ``telemetry``, read /v1/providers once,
    and return its stderr."""
    with RecordingUpstream(auth_server) as upstream:
        route = {"prefix": "/", "upstream": upstream.url, "provider": "db", "mode": "pool"}
        config = {
            "store": "memory",
            "providers": {"db": login(auth_server)},
            "consumers": {"app": {"api_key_sha256": hash_key(KEY), "allow": ["db"]}},
            "server": {"listen": f"127.0.0.1:{free_port()}"},
            "proxy": {"listen": f"127.0.0.1:{free_port()}", "routes": [route]},
            "telemetry": {"log_format": "text", **telemetry},
        }
        with (
            serve_process(tmp_path / "tokenbroker.yaml", config) as served,
            httpx.Client(base_url=served.url, timeout=10) as client,
        ):
            auth = {"Authorization": f"Bearer {KEY}"}
            assert client.get("/v1/providers", headers=auth).status_code == 200
    return served.stderr


def test_proxy_debug_lines_appear_and_others_do_not(
    tmp_path: Path, auth_server: AuthorizationServer
) -> None:
    """With log_filter "info,tokenbroker.proxy=debug" the proxy's debug line is written, the
    API's debug access line is not, and info lines of other loggers still are."""
    stderr = _serve(tmp_path, auth_server, {"log_filter": "info,tokenbroker.proxy=debug"})
    assert PROXY_DEBUG in stderr
    assert ACCESS_DEBUG not in stderr
    assert " DEBUG " not in stderr.replace(PROXY_DEBUG, "")
    assert "INFO tokenbroker.grants token request" in stderr


def test_the_environment_variable_replaces_the_config_filter(
    tmp_path: Path, auth_server: AuthorizationServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TOKENBROKER_LOG_FILTER (the --log-filter option) replaces telemetry.log_filter for
    serve: access debug lines appear, proxy debug lines and info lines do not."""
    monkeypatch.setenv("TOKENBROKER_LOG_FILTER", "warning,tokenbroker.access=debug")
    stderr = _serve(tmp_path, auth_server, {"log_filter": "info,tokenbroker.proxy=debug"})
    assert ACCESS_DEBUG in stderr
    assert PROXY_DEBUG not in stderr
    assert " INFO " not in stderr


def test_the_filter_grammar() -> None:
    """A bare level is the default; pairs set loggers; tpp's words (trace, warn, off) work."""
    parsed = parse_log_filter(" INFO , tokenbroker.proxy=trace,httpx=warn,noisy=off,")
    assert parsed.default == 20
    assert parsed.loggers == (("tokenbroker.proxy", 10), ("httpx", 30), ("noisy", 60))
    assert parse_log_filter("tokenbroker=debug").default is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("info,tokenbroker.proxy=loud", "part 2 (logger tokenbroker.proxy): the level is not"),
        ("verbose", "part 1: the level is not one of trace, debug, info, warn"),
        ("info,debug", "part 2: a second default level"),
        ("info,tpp::proxy=debug", "part 2: the logger name is not a dotted name"),
        ("a=info,a=debug", "part 2: logger a is named twice"),
    ],
)
def test_a_bad_filter_is_a_config_error_naming_the_part(text: str, message: str) -> None:
    """A bad log_filter is a ConfigError at telemetry.log_filter naming the bad part (by
    position; a bad part's text is never quoted)."""
    yaml = f"providers: {{}}\ntelemetry: {{log_filter: {text!r}}}\n"
    with pytest.raises(ConfigError) as caught:
        parse_settings(yaml, {})
    [problem] = caught.value.problems
    assert problem.path == "telemetry.log_filter"
    assert message in problem.message
    assert "loud" not in problem.message and "verbose" not in problem.message


def test_a_bad_command_line_filter_is_a_usage_error() -> None:
    """--log-filter with a bad part exits 2 naming the part, before the command runs."""
    from click.testing import CliRunner

    from tokenbroker.cli.main import main

    result = CliRunner().invoke(main, ["--log-filter", "info,tokenbroker=loud", "keygen"])
    assert result.exit_code == 2
    assert "part 2 (logger tokenbroker): the level is not one of" in result.output
