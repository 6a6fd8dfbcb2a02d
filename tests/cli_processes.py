"""Runs several ``tailgen`` command lines at once, each through the installed console script in a folder of its
own, and collects (exit status, stdout, stderr, folder). Shared by the CLI output / samples-evaluation tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tailgen_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run_all(argvs: dict[str, list[str]], root: Path, timeout: float = 300) -> dict[str, tuple]:
    """name -> (returncode, stdout, stderr, folder) for each command line (all started together)."""
    tailgen = shutil.which("tailgen", path=str(Path(sys.executable).parent)) or "tailgen"
    procs = {}
    for name, argv in argvs.items():
        (root / name).mkdir(exist_ok=True)
        procs[name] = subprocess.Popen([tailgen, *argv], cwd=root / name, env=tailgen_env(), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        out[name] = (proc.returncode, stdout, stderr, root / name)
    return out
