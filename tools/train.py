"""Launch or resume a training run from a ``tailgen fit`` config, with the same LightningCLI settings as
``tailgen`` (subclass mode: configs carry ``class_path``).

    python tools/train.py --config configs/fashion/train_diffusion.yaml [--trainer.max_epochs 20 ...]

Resumes automatically from ``<trainer.default_root_dir>/checkpoints/last.ckpt`` when it exists (a run may be
cut off at any moment; every config checkpoints every few minutes with ``save_last``). Writes this process's
PID to ``<default_root_dir>/pid`` so other people can find the run. Background use:

    mkdir -p runs/NAME && nohup env OMP_NUM_THREADS=1 python tools/train.py --config CFG > runs/NAME/log.txt 2>&1 &
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI


def _root_dir(argv: list[str]) -> Path | None:
    root = None
    for k, a in enumerate(argv):
        if a == "--config" and k + 1 < len(argv):
            cfg = yaml.safe_load(Path(argv[k + 1]).read_text()) or {}
            root = (cfg.get("trainer") or {}).get("default_root_dir", root)
        elif a.startswith("--trainer.default_root_dir"):
            root = a.split("=", 1)[1] if "=" in a else argv[k + 1]
    return Path(root) if root else None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = _root_dir(argv)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "pid").write_text(f"{os.getpid()}\n")
        last = root / "checkpoints" / "last.ckpt"
        if last.exists() and not any(a.startswith("--ckpt_path") for a in argv):
            print(f"resuming from {last}", flush=True)
            argv += ["--ckpt_path", str(last)]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    sys.argv = sys.argv[:1]  # the CLI reads args= only
    LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 save_config_kwargs={"overwrite": True}, args=["fit", *argv])


if __name__ == "__main__":
    main()
