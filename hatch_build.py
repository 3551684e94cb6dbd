"""Build hook: compile the proxy's per-request modules with mypyc.

Off by default, so a plain install (and every editable one) stays pure Python. Turn it
on for a wheel with ``HATCH_BUILD_HOOK_ENABLE_CUSTOM=1`` (``make compiled`` does): the
modules every proxied request runs through become C extensions next to their
``.py`` sources, which Python imports first. Same code, same tests, about a sixth
less CPU per request (``bench/proxy.py`` prints which build it measured).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from mypyc.build import mypycify  # the hook's own dependencies, installed when it is on
from setuptools import Distribution

# Relative to src/: the modules on the per-request path of the proxy.
MODULES = [
    "tokenbroker/proxy/http.py",
    "tokenbroker/proxy/upstream.py",
    "tokenbroker/proxy/exchange.py",
    "tokenbroker/proxy/admission.py",
    "tokenbroker/proxy/connection.py",
]


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compile :data:`MODULES` and ship the extensions in the wheel."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":  # a checkout under development runs its sources
            return
        src = Path(self.root) / "src"
        work = Path(self.root) / "build" / "mypyc"
        shutil.rmtree(work, ignore_errors=True)
        out = work / "lib"
        here = Path.cwd()
        os.chdir(src)  # mypyc names modules by their path from the import root
        try:
            extensions = mypycify(
                [
                    *("--config-file", str(Path(self.root) / "pyproject.toml")),
                    *("--cache-dir", str(work.parent / "mypy-cache")),  # not in src/
                    *MODULES,
                ],
                opt_level="3",
                target_dir=str(work / "c"),
                group_name="tokenbroker",
            )
            command: Any = Distribution({"ext_modules": extensions}).get_command_obj("build_ext")
            command.build_lib = str(out)
            command.build_temp = str(work / "temp")
            command.ensure_finalized()
            command.run()
        finally:
            os.chdir(here)
        built = sorted(out.rglob("*.so"))
        if len(built) != len(MODULES) + 1:  # one per module, plus the shared runtime
            raise RuntimeError(f"mypyc built {[p.name for p in built]}, expected {MODULES}")
        for path in built:
            build_data["force_include"][str(path)] = path.relative_to(out).as_posix()
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
