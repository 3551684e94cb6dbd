"""tpp's ``config.yaml`` translated into a tokenbroker configuration (``tokenbroker import tpp``).

tpp (github.com/Yvictor/tpp, a Bearer-token pool proxy for DolphinDB) reads::

    listen: "0.0.0.0:8080"                 # required
    health_listen: "0.0.0.0:9090"          # optional
    upstream: {host, port, tls: false}     # host and port required
    credential: {username, password}       # one account, logged in pool_size times
    token: {pool_size: 10, ttl_seconds: 3600, refresh_check_seconds: 60}
    telemetry: {otlp_endpoint, log_filter}

and lets ``TPP_*`` environment variables override each value. :func:`translate_tpp` maps that
document onto a login provider (``dolphindb``, DolphinDB's ``/api/login`` reply
``{"code": 0, "result": [TOKEN]}``), one pool route and the proxy's ports, with
``metrics_compat: tpp``. The password never enters the written configuration: it reads
``${TPP_CREDENTIAL_PASSWORD}`` (tpp's own variable), and a password written in the tpp file is
returned in :attr:`Imported.env` for ``.env``. Nothing here reads files or the environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .logfilter import parse_log_filter

__all__ = ["PASSWORD_VAR", "PROVIDER", "Imported", "translate_tpp"]

#: The provider the imported pool logs in with.
PROVIDER = "dolphindb"
#: The variable the written configuration reads the account's password from (tpp's name).
PASSWORD_VAR = "TPP_CREDENTIAL_PASSWORD"
#: tpp's keys, each with the tokenbroker field it becomes (for the README's table too).
MAPPED = {
    "listen": "proxy.listen",
    "health_listen": "proxy.health_listen",
    "upstream.host": "proxy.routes[0].upstream, providers.dolphindb.login_url",
    "upstream.port": "proxy.routes[0].upstream, providers.dolphindb.login_url",
    "upstream.tls": "https:// in both URLs",
    "credential.username": "providers.dolphindb.credentials[0].username",
    "credential.password": f"${{{PASSWORD_VAR}}} (.env)",
    "token.pool_size": "providers.dolphindb.credentials[0].sessions",
    "token.ttl_seconds": "providers.dolphindb.ttl_seconds",
    "token.refresh_check_seconds": "proxy.refresh_check_seconds",
    "telemetry.log_filter": "telemetry.log_filter",
}
_SECTIONS = {
    "upstream": ("host", "port", "tls"),
    "credential": ("username", "password"),
    "token": ("pool_size", "ttl_seconds", "refresh_check_seconds"),
    "telemetry": ("otlp_endpoint", "log_filter"),
}
_TOP = ("listen", "health_listen", *_SECTIONS)


@dataclass
class Imported:
    """The translation of one tpp configuration.

    Attributes:
        config: The tokenbroker configuration document (no secret in it).
        env: Variables for ``.env`` (the password when the tpp file held it).
        unmapped: One line per tpp key that has no tokenbroker equivalent, and why.
        problems: Why the tpp file cannot be imported (empty when it can).
    """

    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _section(data: dict[str, Any], name: str, out: Imported) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        out.problems.append(f"{name}: must be a mapping")
        return {}
    for key in value:
        if key not in _SECTIONS[name]:
            out.unmapped.append(f"{name}.{key}: not a tpp setting; left out")
    return value


def _int(section: dict[str, Any], name: str, where: str, out: Imported) -> int | None:
    value = section.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        out.problems.append(f"{where}: must be a whole number")
        return None
    return value


def _log_filter(text: object, out: Imported) -> str | None:
    """tpp's ``EnvFilter`` directives with tpp's target (``tpp``, ``tpp::module``) renamed
    ``tokenbroker``; other crates' targets are left out (reported)."""
    if not isinstance(text, str) or not text.strip():
        return None
    kept: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        target, sep, level = part.partition("=")
        if not sep:
            kept.append(part)
        elif re.fullmatch(r"tpp(::\w+)*", target.strip()):
            kept.append(f"tokenbroker={level.strip()}")
        elif part:
            out.unmapped.append(
                f"telemetry.log_filter: the directive for target {target.strip()!r} names a"
                " Rust crate; left out"
            )
    filtered = ",".join(kept)
    try:
        parse_log_filter(filtered)
    except ValueError as exc:
        out.unmapped.append(f"telemetry.log_filter: {exc}; left out (log_level: info applies)")
        return None
    return filtered


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def translate_tpp(data: object) -> Imported:
    """Translate a parsed tpp ``config.yaml``.

    Args:
        data: The YAML document as parsed.

    Returns:
        The configuration, the ``.env`` variables, the unmapped keys and any problems; when
        :attr:`Imported.problems` is not empty, nothing should be written.
    """
    out = Imported()
    if not isinstance(data, dict):
        out.problems.append("the file is not a YAML mapping")
        return out
    for key in data:
        if key not in _TOP:
            out.unmapped.append(f"{key}: not a tpp setting; left out")
    upstream = _section(data, "upstream", out)
    credential = _section(data, "credential", out)
    token = _section(data, "token", out)
    telemetry = _section(data, "telemetry", out)
    listen, health = data.get("listen"), data.get("health_listen")
    host, username = upstream.get("host"), credential.get("username")
    port = _int(upstream, "port", "upstream.port", out)
    for where, value in (
        ("listen", listen),
        ("upstream.host", host),
        ("credential.username", username),
    ):
        if not isinstance(value, str) or not value:
            out.problems.append(f"{where}: required (a string)")
    if not port:
        out.problems.append("upstream.port: required (a port number above 0)")
    if not isinstance(upstream.get("tls", False), bool):
        out.problems.append("upstream.tls: must be true or false")
    pool_size = _int(token, "pool_size", "token.pool_size", out)
    ttl = token.get("ttl_seconds")
    check = token.get("refresh_check_seconds")
    if out.problems:
        return out
    scheme = "https" if upstream.get("tls") is True else "http"
    base = f"{scheme}://{_host(str(host))}:{port}"
    account: dict[str, Any] = {"username": username, "password": f"${{{PASSWORD_VAR}}}"}
    account["sessions"] = pool_size or 10  # tpp's default pool_size
    password = credential.get("password")
    if isinstance(password, str) and password:
        out.env[PASSWORD_VAR] = password
    provider: dict[str, Any] = {
        "grant": "login",
        "login_url": f"{base}/api/login",
        # DolphinDB answers {"code": 0, "result": [TOKEN]} (tpp's token_acquirer.rs).
        "token_path": "result.0",
        "ttl_seconds": ttl if ttl is not None else 3600,
        "credentials": [account],
    }
    proxy: dict[str, Any] = {"listen": listen}
    if health:
        proxy["health_listen"] = health
    proxy["refresh_check_seconds"] = check if check is not None else 60
    proxy["metrics_compat"] = "tpp"
    proxy["routes"] = [{"prefix": "/", "upstream": base, "provider": PROVIDER, "mode": "pool"}]
    out.config = {
        "store": "sqlite:///./tokenbroker.db",
        "encryption_keys": ["${TOKENBROKER_KEY}"],
        "providers": {PROVIDER: provider},
        "proxy": proxy,
    }
    log_filter = _log_filter(telemetry.get("log_filter"), out)
    if log_filter is not None:
        out.config["telemetry"] = {"log_filter": log_filter}
    if telemetry.get("otlp_endpoint"):
        out.unmapped.append(
            "telemetry.otlp_endpoint: tokenbroker does not export OpenTelemetry yet; left out"
            " (scrape /metrics on the health port instead)"
        )
    return out
