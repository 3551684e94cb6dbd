"""The Makefile's quick start: ``make run`` installs only inside the project folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` (bytecode caches aside) with its size."""
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_make_install_run_leaves_the_interpreter_it_was_given_untouched(tmp_path: Path) -> None:
    """``make install-run`` (what ``make run`` does first) adds nothing to the Python it is given."""
    system = tmp_path / "system"
    subprocess.run([sys.executable, "-m", "venv", str(system)], check=True)
    before = _files(system)
    project = tmp_path / "project"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL")
    }
    done = subprocess.run(
        ["make", "install-run", f"PY={system / 'bin' / 'python'}"],
        check=False,
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (project / ".venv" / "bin" / "tokenbroker").exists()
    after = _files(system)
    added = sorted(set(after) - set(before))
    assert not added, f"installed outside the project: {added[:10]}"
    assert after == before
