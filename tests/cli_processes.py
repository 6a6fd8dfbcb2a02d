"""Runs several ``tailgen`` command lines at once, each through the installed console script in a folder of its
own, and collects (exit status, stdout, stderr, folder). Shared by the CLI output / samples-evaluation tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tailgen_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run_all(argvs: dict[str, list[str]], root: Path, timeout: float = 300, env: dict | None = None) -> dict[str, tuple]:
    """name -> (returncode, stdout, stderr, folder) for each command line (all started together; ``env`` added to
    every process's environment)."""
    tailgen = shutil.which("tailgen", path=str(Path(sys.executable).parent)) or "tailgen"
    procs = {}
    for name, argv in argvs.items():
        (root / name).mkdir(exist_ok=True)
        procs[name] = subprocess.Popen([tailgen, *argv], cwd=root / name, env={**tailgen_env(), **(env or {})},
                                       text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        out[name] = (proc.returncode, stdout, stderr, root / name)
    return out


def run_forked(argvs: dict[str, list[str]], root: Path, jobs: int, env: dict | None = None,
               timeout: float = 900) -> dict[str, tuple]:
    """As :func:`run_all`, but through ``tests/cli_runner.py`` (tailgen imported once, each command line in a forked
    process of its own, ``jobs`` at a time): much cheaper than one interpreter per command."""
    cases = []
    for name, argv in argvs.items():
        (root / name).mkdir(exist_ok=True)
        cases.append({"argv": argv, "cwd": str(root / name), "env": env or {}, "out": str(root / name / ".result")})
    (root / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, str(REPO / "tests/cli_runner.py"), str(root / "cases.json"), str(jobs)],
                   env=tailgen_env(), check=True, timeout=timeout)
    out = {}
    for name in argvs:
        result = root / name / ".result"
        out[name] = (int((result / "rc").read_text()), (result / "stdout").read_text(),
                     (result / "stderr").read_text(), root / name)
    return out


def found(folder: Path, name: str = "metrics.json") -> list[Path]:
    """Every file called ``name`` under ``folder`` (tailgen test writes into a run folder of its own, e.g.
    ``<default_root_dir>/version_0/`` without a logger)."""
    return sorted(folder.rglob(name))


def the_one(folder: Path, name: str = "metrics.json") -> Path:
    paths = found(folder, name)
    assert len(paths) == 1, (name, paths)
    return paths[0]
