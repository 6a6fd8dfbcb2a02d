"""Runs many ``tailgen`` command lines cheaply: imports ``tailgen.cli`` once, then runs every case in a process of
its own (``os.fork``), its stdout / stderr in files and its exit status recorded, as the console script would
(an uncaught exception prints its traceback and exits 1). Used by tests/test_cli_errors.py:

    python tests/cli_runner.py cases.json [jobs]

``cases.json``: a list of {"argv": [...], "cwd": DIR, "env": {...}, "out": DIR}; writes ``out/stdout``,
``out/stderr`` and ``out/rc`` for each.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _child(case: dict, tailgen_main) -> None:
    code = 1
    try:
        os.makedirs(case["out"], exist_ok=True)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            handle = os.open(os.path.join(case["out"], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        os.chdir(case["cwd"])
        os.environ.update(case.get("env") or {})
        sys.argv = ["tailgen", *case["argv"]]
        try:
            tailgen_main(case["argv"])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else (0 if exit_info.code is None else 1)
            if isinstance(exit_info.code, str):
                print(exit_info.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as the interpreter would: traceback, exit status 1
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    import torch

    torch.set_num_threads(1)
    from tailgen.cli import main as tailgen_main

    running: dict[int, dict] = {}

    def reap() -> None:
        pid, status = os.wait()
        case = running.pop(pid)
        with open(os.path.join(case["out"], "rc"), "w") as f:
            f.write(str(os.waitstatus_to_exitcode(status)))

    for case in cases:
        while len(running) >= jobs:
            reap()
        pid = os.fork()
        if pid == 0:
            _child(case, tailgen_main)
        running[pid] = case
    while running:
        reap()


if __name__ == "__main__":
    main()
