"""The import arrows run one way (STYLE.md 1): every module's imports are read from its source."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import tokenbroker

ROOT = Path(tokenbroker.__file__).parent

#: Each folder's layer: a module may import tokenbroker modules of its own layer or below.
LAYERS = {
    "errors": 0,
    "core": 0,
    "store": 1,
    "config": 2,
    "grants": 3,
    "edge": 3,
    # Beside the engine: Broker uses the adapters, BrokerClient the engine's TokenCache.
    "client": 4,
    "engine": 4,
    # Beside the engine: Redis coordination implementing the engine's Coordinator protocol.
    "cluster": 4,
    "telemetry": 5,
    "api": 5,
    "proxy": 5,
    # Beside the engine: client reads the jobs model and events (jobs imports no client).
    "jobs": 4,
    "cli": 6,
    "testing": 6,
    "__init__": 4,  # the library's surface: engine, client, config, core
}
#: Libraries only the outer layers (telemetry, api, proxy, cli, testing) may import.
SERVER_LIBRARIES = {
    *("fastapi", "starlette", "prometheus_client", "uvicorn", "click", "rich"),
    "opentelemetry",  # the otel extra: telemetry/tracing.py only
}


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["tokenbroker", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _imports(name: str, path: Path, *, runtime_only: bool) -> set[str]:
    """Absolute names of what ``name`` imports (relative imports resolved); with
    ``runtime_only``, imports under ``if TYPE_CHECKING:`` are left out."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = dict(_modules())
OURS = set(MODULES)


def test_every_folder_has_a_layer() -> None:
    """A new folder must be placed in the layering before its modules can be checked."""
    assert {_folder(name) for name in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    """A module imports only tokenbroker modules of its own layer or below; the core imports
    nothing of ours but errors; no layer under the outer ones imports a web, metrics or CLI
    library."""
    folder = _folder(name)
    imported = _imports(name, MODULES[name], runtime_only=False)
    ours = {module for module in imported if module in OURS}
    upward = sorted(m for m in ours if LAYERS[_folder(m)] > LAYERS[folder])
    assert upward == [], f"{name} imports from a higher layer"
    if folder == "core":
        assert {_folder(m) for m in ours} <= {"core", "errors"}
    if LAYERS[folder] < LAYERS["telemetry"]:
        libraries = {module.split(".")[0] for module in imported}
        assert libraries & SERVER_LIBRARIES == set()


def test_no_import_loops() -> None:
    """No module reaches itself through runtime imports (type-only imports excluded)."""
    # A module importing its own package (its __init__, which re-exports it) is no loop.
    graph = {
        name: {
            m
            for m in _imports(name, path, runtime_only=True)
            if m in OURS and m != name and not name.startswith(m + ".")
        }
        for name, path in MODULES.items()
    }
    loops: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loops.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert loops == []
