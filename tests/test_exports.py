"""The public surface: a sorted __all__ that matches the package, and no server imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tokenbroker


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted and every name in it exists and is documented."""
    names = tokenbroker.__all__
    assert names == sorted(names)
    for name in names:
        value = getattr(tokenbroker, name)
        if name != "__version__":
            assert value.__doc__, f"{name} has no docstring"


def test_import_does_not_pull_in_web_metrics_or_test_libraries() -> None:
    """`import tokenbroker` imports no FastAPI, Starlette, prometheus_client, authlib or requests."""
    code = (
        "import sys, tokenbroker; "
        "bad = [m for m in ('fastapi', 'starlette', 'prometheus_client', 'authlib', "
        "'requests', 'uvicorn') if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_core_modules_never_import_the_cli_library() -> None:
    """Only cli.py imports click (httpx itself imports click when installed, which we can't stop)."""
    package = Path(tokenbroker.__file__).parent
    offenders = [
        path.name
        for path in package.glob("*.py")
        if path.name != "cli.py"
        and re.search(r"^\s*(from|import)\s+(click|typer|rich)\b", path.read_text(), re.M)
    ]
    assert offenders == []


def test_library_prints_nothing_when_logging_is_not_configured() -> None:
    """A failing fetch in a program that configured no logging writes nothing to stderr
    (no fallback 'last resort' handler output from the library)."""
    code = (
        "import tokenbroker\n"
        "from tokenbroker import Broker, parse_settings\n"
        "from tokenbroker.errors import TokenBrokerError\n"
        "config = '''\n"
        "store: memory\n"
        "defaults: {retries: 1, backoff_seconds: 0.01, deadline_seconds: 2}\n"
        "providers:\n"
        "  svc: {grant: client_credentials, token_url: 'http://127.0.0.1:1/token',\n"
        "        client_id: c, client_secret: s}\n"
        "'''\n"
        "broker = Broker(parse_settings(config, {}))\n"
        "try:\n"
        "    broker.get_token('svc')\n"
        "except TokenBrokerError as exc:\n"
        "    print(type(exc).__name__)\n"
        "broker.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "ProviderUnavailableError"
    assert done.stderr == ""
