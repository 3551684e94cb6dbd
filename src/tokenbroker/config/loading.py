"""Loading: YAML with ``${VAR}`` interpolation and ``.env``, validated into frozen settings.

With :mod:`.checks`, the only code that reads environment variables and files. Loading is
loose at the edge (YAML, strings, env) and strict inside: the result is a frozen
:class:`~tokenbroker.config.Settings` whose secrets are
:class:`~tokenbroker.core.secret.Secret`. Every problem is collected with its dotted field
path; a missing environment variable is named; no message ever contains a value from the file.

A value taken from the environment or ``.env`` is stripped of surrounding whitespace and
newlines (a secret pasted with its line break still works; :func:`stripped_variables` says
which were, for ``tokenbroker check``), and a credential (``client_id``, ``client_secret``,
``refresh_token``, ``private_key``, an account's ``username`` / ``password``) that is blank
is a problem, naming the variable it came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from dotenv import dotenv_values
from pydantic import ValidationError

from ..errors import ConfigError, ConfigProblem
from .problems import validation_problems
from .providers import Defaults
from .sections import Settings

__all__ = [
    "default_config_path",
    "load_settings",
    "parse_settings",
    "stripped_variables",
]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MAX_DEPTH = 50
_MAX_NODES = 100_000
#: Fields of a provider (or of one of its ``credentials``) that may not be blank.
_CREDENTIALS = frozenset({"client_id", "refresh_token", "username", "password"})
#: Optional credentials: blank from a variable is a problem; ``""`` or ``${VAR:-}`` means none.
_OPTIONAL_CREDENTIALS = frozenset({"client_secret", "private_key"})


def default_config_path() -> Path:
    """The config file to use when none is given: ``$TOKENBROKER_CONFIG`` or ``tokenbroker.yaml``.

    Returns:
        The path (not checked for existence).
    """
    return Path(os.environ.get("TOKENBROKER_CONFIG") or "tokenbroker.yaml")


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read, interpolate and validate a config file.

    ``${VAR}`` and ``${VAR:-default}`` are taken from the process environment,
    then from a ``.env`` file beside the config file (the environment wins), stripped of
    surrounding whitespace and newlines.

    Args:
        path: The YAML file; default :func:`default_config_path`.

    Returns:
        The frozen settings.

    Raises:
        ConfigError: Listing every problem, each with its field path.
    """
    file = Path(path) if path is not None else default_config_path()
    text, env = _read(file)
    return parse_settings(text, env, base_dir=file.parent)


def stripped_variables(path: str | os.PathLike[str] | None = None) -> list[ConfigProblem]:
    """The environment variables whose value :func:`load_settings` stripped of surrounding
    whitespace or newlines, one note per field that used one (``tokenbroker check`` prints them).

    Args:
        path: The YAML file; default :func:`default_config_path`.

    Returns:
        One note per field and variable, naming both, never the value; empty when the file
        cannot be read or parsed (:func:`load_settings` reports that).
    """
    file = Path(path) if path is not None else default_config_path()
    try:
        text, env = _read(file)
        raw = _parse_yaml(text)
    except ConfigError:
        return []
    stripped: list[tuple[str, str]] = []
    _interpolate(raw, env, (), [], stripped)
    return [
        ConfigProblem(
            where,
            f"the value of {name} had surrounding whitespace or a newline, which was stripped",
            env_var=name,
        )
        for where, name in dict.fromkeys(stripped)
    ]


def _read(file: Path) -> tuple[str, dict[str, str]]:
    """The text of ``file`` and the variables for it: ``.env`` beside it, then the environment."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read {file}: {exc.strerror}")]) from exc
    except ValueError as exc:  # UnicodeDecodeError, or a NUL byte in the path
        raise ConfigError(
            [ConfigProblem("", f"cannot read {file}: invalid path or not UTF-8 text")]
        ) from exc
    env: dict[str, str] = {}
    dotenv = file.parent / ".env"
    if dotenv.is_file():
        env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    env.update(os.environ)
    return text, env


def parse_settings(text: str, env: Mapping[str, str], *, base_dir: Path = Path()) -> Settings:
    """Validate config text against an explicit environment (no process state is read).

    Args:
        text: The YAML document.
        env: Variables for ``${VAR}`` interpolation.
        base_dir: Where relative ``credentials_file`` paths are resolved.

    Returns:
        The frozen settings.

    Raises:
        ConfigError: Listing every problem, each with its field path.
    """
    raw = _parse_yaml(text)
    problems: list[ConfigProblem] = []
    data = _interpolate(raw, env, (), problems, [])
    _read_credential_files(data, base_dir, problems)
    _resolve_store(data, base_dir)
    try:
        settings = Settings.model_validate(data, context=_context(data))
    except ValidationError as exc:
        problems += validation_problems(exc, {p.path for p in problems})
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return settings


def _parse_yaml(text: str) -> dict[str, Any]:
    """The document as a mapping, refused (ConfigError) when not YAML, not a mapping or unsafe
    to walk."""
    loader = None
    try:
        loader = _Loader(text)
        raw = loader.get_single_data()
    except (yaml.YAMLError, RecursionError) as exc:
        # The parser's reason names at most one character of the text, never a value.
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None)
        mark = getattr(exc, "problem_mark", None)
        reason = f": {problem}" if problem else ""
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([ConfigProblem("", f"not valid YAML{reason}{where}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem("", "the document must be a mapping")])
    too_big = _too_big(raw)
    if too_big:
        raise ConfigError([ConfigProblem("", f"the document {too_big}")])
    return raw


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_document(self, node: yaml.Node) -> Any:
        # Checked on the composed nodes, before merge keys (``<<``) are flattened into them.
        stack, seen = [node], set()
        while stack:
            item = stack.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, yaml.MappingNode):
                keys: set[tuple[str, str]] = set()
                for key, value in item.value:
                    if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                        if (key.tag, key.value) in keys:
                            raise yaml.constructor.ConstructorError(
                                problem=f"the key {key.value!r} is given twice",
                                problem_mark=key.start_mark,
                            )
                        keys.add((key.tag, key.value))
                    stack.extend((key, value))
            elif isinstance(item, yaml.SequenceNode):
                stack.extend(item.value)
        return super().construct_document(node)


def _context(data: dict[str, Any]) -> dict[str, Any]:
    """What cross-field checks need: provider names, and the lease a provider's deadline needs."""
    providers = data.get("providers")
    try:
        lease = Defaults.model_validate(data.get("defaults", {})).lease_seconds
    except ValidationError:  # reported where Settings validates defaults
        lease = None
    return {
        "providers": set(providers) if isinstance(providers, dict) else None,
        "lease_seconds": lease,
    }


def _too_big(node: Any) -> str | None:
    """Why ``node`` is unsafe to walk (deep nesting, alias loops, alias bombs), or None."""
    stack, count = [(node, 0)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > _MAX_DEPTH:
            return "nests too deeply (or a YAML alias refers to itself)"
        if count > _MAX_NODES:
            return "is too large once YAML aliases are expanded"
        if isinstance(item, dict):
            stack.extend((value, depth + 1) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in item)
    return None


def _interpolate(
    node: Any,
    env: Mapping[str, str],
    path: tuple[str, ...],
    problems: list[ConfigProblem],
    stripped: list[tuple[str, str]],
) -> Any:
    """``node`` with ``${VAR}`` replaced by stripped values; a missing variable and a blank
    credential go to ``problems``, (field path, variable) of each value stripped to ``stripped``."""
    if isinstance(node, dict):
        return {
            k: _interpolate(v, env, (*path, str(k)), problems, stripped) for k, v in node.items()
        }
    if isinstance(node, list):
        return [
            _interpolate(v, env, (*path, str(i)), problems, stripped) for i, v in enumerate(node)
        ]
    if not isinstance(node, str):
        return node
    where = ".".join(path)
    used: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        raw = env.get(name)
        # A pasted secret often brings its line break; whitespace is never part of a credential.
        value = None if raw is None else raw.strip()
        if raw is not None and value != raw:
            stripped.append((where, name))
        if value is None or (value == "" and default is not None):
            if default is not None:
                return default
            problems.append(
                ConfigProblem(where, f"environment variable {name} is not set", env_var=name)
            )
            return ""
        used.append(name)
        return value

    result = _ENV_REF.sub(substitute, node)
    blank = not result.strip() and not any(p.path == where for p in problems)
    if blank and (_is_credential(path, _CREDENTIALS) or (used and _is_credential(path))):
        name = used[0] if used else None
        why = f" (environment variable {name} is empty or only whitespace)" if name else ""
        problems.append(ConfigProblem(where, f"is blank{why}", env_var=name))
    return result


def _is_credential(
    path: tuple[str, ...], fields: frozenset[str] = _CREDENTIALS | _OPTIONAL_CREDENTIALS
) -> bool:
    """``path`` is one of ``fields`` of a provider, or of one of its ``credentials`` accounts."""
    if not path or path[0] != "providers" or path[-1] not in fields:
        return False
    return len(path) == 3 or (len(path) == 5 and path[2] == "credentials")


def _resolve_store(data: dict[str, Any], base: Path) -> None:
    """A relative ``sqlite:///path`` is relative to the config file, like ``credentials_file``."""
    store = data.get("store", Settings.model_fields["store"].default)
    if isinstance(store, str) and store.startswith("sqlite:///"):
        path = Path(store.removeprefix("sqlite:///"))
        if not path.is_absolute() and str(path) != ":memory:":
            data["store"] = f"sqlite:///{base / path}"


def _read_credential_files(data: dict[str, Any], base: Path, problems: list[ConfigProblem]) -> None:
    providers = data.get("providers")
    if not isinstance(providers, dict):
        return
    for name, provider in providers.items():
        if not isinstance(provider, dict) or "credentials_file" not in provider:
            continue
        where = f"providers.{name}.credentials_file"
        file = Path(str(provider.pop("credentials_file")))
        file = file if file.is_absolute() else base / file
        inline = provider.get("credentials")
        if inline is not None and not isinstance(inline, list):
            continue  # pydantic reports the wrong type at providers.<name>.credentials
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            problems.append(ConfigProblem(where, f"cannot read {file}: {exc.strerror}"))
            continue
        except ValueError:  # UnicodeDecodeError, or a NUL byte in the path
            problems.append(
                ConfigProblem(where, f"cannot read {file}: invalid path or not UTF-8 text")
            )
            continue
        accounts = list(inline or [])
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            username, sep, password = line.strip().partition(":")
            if not sep or not username or not password:
                problems.append(ConfigProblem(where, f"line {number} is not username:password"))
                continue
            accounts.append({"username": username, "password": password})
        provider["credentials"] = accounts
