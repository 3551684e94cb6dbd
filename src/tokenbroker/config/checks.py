"""Checks on valid settings: what stops a broker from starting (:func:`startup_problems`), and
what is valid but unwise or worth knowing (:func:`config_warnings`: a secret in a file others
may read, a setting nothing reads yet, a variable whose value was stripped of whitespace).
No message quotes a value from the file or the environment.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..errors import ConfigProblem
from ..store import is_persistent
from .loading import _ENV_REF, _Loader, stripped_variables
from .sections import Settings

__all__ = [
    "MISSING_KEY",
    "config_warnings",
    "startup_problems",
]

MISSING_KEY = (
    "is required for a file store (generate a key with `tokenbroker keygen`), or set store: memory"
)


def startup_problems(settings: Settings) -> list[ConfigProblem]:
    """Problems that stop a broker from starting although the file itself is valid.

    Args:
        settings: Validated settings.

    Returns:
        The problems (empty when the broker can start).
    """
    if is_persistent(settings.store) and not settings.encryption_keys:
        return [ConfigProblem("encryption_keys", MISSING_KEY)]
    return []


def config_warnings(
    settings: Settings, path: str | os.PathLike[str] | None = None
) -> list[ConfigProblem]:
    """Settings that are valid but unwise or that nothing reads yet (``tokenbroker check``
    prints them; ``serve`` logs them).

    Args:
        settings: Validated settings.
        path: The file they were read from: a secret written in it (not ``${VAR}``), or a
            ``credentials_file``, that group or others may read is a warning too, and so is
            a variable whose value loading stripped of surrounding whitespace or newlines
            (named, never quoted).

    Returns:
        One problem per such setting; the setting's value is never quoted.
    """
    warnings = [] if path is None else _readable_secrets(Path(path)) + stripped_variables(path)
    if settings.redis is not None and importlib.util.find_spec("redis") is None:
        warnings.append(
            ConfigProblem("redis", "needs the redis client: pip install 'tokenbroker[redis]'")
        )
    if settings.telemetry.otlp_endpoint is not None:
        warnings.append(
            ConfigProblem("telemetry.otlp_endpoint", "is not used yet: nothing is exported")
        )
    get_token = settings.compat.get_token
    if get_token is not None and get_token.trusted_networks:
        networks = ", ".join(get_token.trusted_networks)
        warnings.append(
            ConfigProblem(
                "compat.get_token.trusted_networks",
                f"callers from {networks} get {get_token.provider} tokens without a key",
            )
        )
    return warnings


#: Fields whose value is a secret, wherever they appear (``password`` in ``credentials``, a
#: login request template ...); ``redis`` only for the password in its URL.
_SECRET_FIELDS = frozenset(
    {"client_secret", "private_key", "refresh_token", "password", "encryption_keys", "redis"}
)


def _readable_secrets(file: Path) -> list[ConfigProblem]:
    """A warning for ``file`` if it holds a secret literally and group or others may read it,
    and for each ``credentials_file`` it names that they may read."""
    if os.name == "nt":  # no POSIX modes to check
        return []
    loader = None
    try:
        loader = _Loader(file.read_text(encoding="utf-8"))
        raw = loader.get_single_data()
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return []  # load_settings has read it once; a race is not worth a second report
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(raw, dict):
        return []
    warnings = []
    literal = _literal_secrets(raw, ())
    if literal:
        more = f" (and {len(literal) - 1} more secret field(s))" if len(literal) > 1 else ""
        readable = _group_or_world(file, f"is a secret written in {file}{more}")
        warnings += [ConfigProblem(literal[0], readable)] if readable else []
    providers = raw.get("providers")
    for name, provider in providers.items() if isinstance(providers, dict) else ():
        listed = provider.get("credentials_file") if isinstance(provider, dict) else None
        if isinstance(listed, str) and not _ENV_REF.search(listed):
            accounts = Path(listed) if Path(listed).is_absolute() else file.parent / listed
            readable = _group_or_world(accounts, f"{accounts} holds passwords")
            where = f"providers.{name}.credentials_file"
            warnings += [ConfigProblem(where, readable)] if readable else []
    return warnings


def _group_or_world(file: Path, what: str) -> str | None:
    """The warning for ``file`` (``what`` it holds) if group or others may read or write it."""
    try:
        mode = file.stat().st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"{what}, which group or others may read (mode {mode:04o}): "
        f"run `chmod 600 {file}`, or set the secret from an environment variable (${{VAR}})"
    )


def _literal_secrets(node: Any, path: tuple[str, ...]) -> list[str]:
    """The dotted paths of secret fields under ``node`` whose value is written out, not
    taken whole from ``${VAR}`` (a ``${VAR:-default}`` default is written out too)."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        where = (*path, str(key))
        if isinstance(key, str) and key in _SECRET_FIELDS:
            values = value if isinstance(value, list) else [value]
            if key == "redis":
                values = [urlsplit(v).password if isinstance(v, str) else None for v in values]
            if any(_written_out(v) for v in values):
                found.append(".".join(where))
        elif isinstance(value, (dict, list)) and key != "request":
            # (a login request template's "{password}" is a placeholder, not a secret)
            found += _literal_secrets(value, where)
    return found


def _written_out(value: object) -> bool:
    if value is None or value == "":
        return False
    if not isinstance(value, str):
        return True  # a number or a mapping is written in the file too
    if any(match.group(2) for match in _ENV_REF.finditer(value)):
        return True
    return bool(_ENV_REF.sub("", value).strip())
