"""Each run's own folder, so runs never overwrite each other's files.

    tailgen predict   writer.output_dir/            config.yaml, samples.npz, samples.json, grid.png (writer.py)
    tailgen test      the run folder below          config.yaml, metrics.json, grid.png (+ samples.npz, samples.json
                                                    with evaluation.keep_samples), the logger's own files

The run folder of ``tailgen test`` (relative ``evaluation.output`` paths resolve under it; an absolute one is used as
given, and config.yaml goes beside it):

    CSV / TensorBoard logger   the logger's version folder ``save_dir/name/version_N`` (N claimed atomically)
    W&B logger                 ``save_dir/<W&B run name>/<W&B run id>``
    no logger (or another)     ``default_root_dir/version_N`` (``save_dir/version_N`` for another logger)

``version_N`` is claimed with ``mkdir`` (which fails if the folder exists), so runs started at the same moment get
different folders. Rank 0 decides and broadcasts, so every rank writes into the same folder.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

_VERSION = re.compile(r"version_(\d+)$")
_CACHE = "_tailgen_run_folder"


def claim_version(root: Path) -> int:
    """The next free ``root/version_N``, created here (an existing folder is never reused)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{n}").mkdir()
            return n
        except FileExistsError:  # another run took it meanwhile
            n += 1


def claim_logger_version(trainer: L.Trainer) -> None:
    """Give a CSV / TensorBoard logger without a version an atomically claimed one (Lightning's own choice of the
    next version races between runs started together). Call on rank 0 before the run starts."""
    logger = trainer.logger
    if rank_zero_only.rank == 0 and isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger._version is None:
        logger._version = claim_version(Path(logger.root_dir))


def _new_folder(trainer: L.Trainer) -> Path:
    logger = trainer.logger
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        claim_logger_version(trainer)
        return Path(logger.log_dir)
    if isinstance(logger, WandbLogger):
        run = logger.experiment  # rank 0: the W&B run (created by Lightning before setup)
        return Path(logger.save_dir or trainer.default_root_dir) / str(run.name or "run") / str(run.id)
    root = Path(getattr(logger, "save_dir", None) or trainer.default_root_dir) if logger else Path(trainer.default_root_dir)
    return root / f"version_{claim_version(root)}"


def run_folder(trainer: L.Trainer) -> Path:
    """This run's folder (see the module docstring). The first call must happen on every rank (it broadcasts);
    later calls return the same folder."""
    folder = getattr(trainer, _CACHE, None)
    if folder is None:
        folder = str(_new_folder(trainer)) if trainer.is_global_zero else None
        folder = Path(trainer.strategy.broadcast(folder, src=0))
        setattr(trainer, _CACHE, folder)
    return folder


def output_path(trainer: L.Trainer, output: str) -> Path:
    """``output`` as given if absolute, else under the run folder."""
    path = Path(output).expanduser()
    return path if path.is_absolute() else run_folder(trainer) / path


def config_name(folder: Path, stage: str) -> str:
    """``config.yaml``; ``test_config.yaml`` when ``tailgen test`` writes into a ``tailgen predict`` output folder
    (evaluating samples in place), so the config that made the samples stays."""
    from tailgen.module.shards import PROVENANCE, read_json

    record = read_json(folder / PROVENANCE) if stage == "test" else None
    return "test_config.yaml" if record is not None and record.get("command", "predict") != "test" else "config.yaml"


def guidance_summary(guidances: Optional[Mapping[str, Any]]) -> str:
    """``cg1+tail0.5`` (name + scale of each guidance, in order), ``unguided`` for none."""
    parts = []
    for name, entry in (guidances or {}).items():  # config entries {class_path, init_args} or Guidance objects
        init_args = entry.get("init_args") if hasattr(entry, "get") else None
        scale = init_args.get("scale") if hasattr(init_args, "get") else getattr(entry, "scale", None)
        parts.append(f"{name}{scale:g}" if isinstance(scale, (int, float)) else str(name))
    return "+".join(parts) or "unguided"


def run_name(stem: str, guidances: Optional[Mapping[str, Any]], samples: Optional[str] = None,
             now: Optional[datetime.datetime] = None) -> str:
    """A distinct, informative W&B run name: ``<config stem>-<guidances>-<YYYYmmdd-HHMMSS-mmm>``, e.g.
    ``tail-cg1+tail2-20261201-102328-417``; evaluating a samples file: ``<stem>-samples_<its folder>-<time>``."""
    now = now or datetime.datetime.now()
    what = f"samples_{Path(samples).parent.name or Path(samples).stem}" if samples else guidance_summary(guidances)
    return f"{stem}-{what}-{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}"


__all__ = ["claim_version", "claim_logger_version", "run_folder", "output_path", "config_name", "guidance_summary",
           "run_name"]
