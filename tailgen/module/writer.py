"""Writes predicted samples: atomic per-batch shards, then one ``samples.npz`` and a ``grid.png``.

``samples.npz`` follows guided-diffusion's format (``arr_0`` uint8 N×H×W×C, ``arr_1`` int64 labels) so
ADM's evaluator reads it; ``seeds`` and ``indices`` are stored beside them. Shards of an interrupted run
are never deleted: a new run moves them aside to ``shards.old-<time>``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from tailgen.utils.images import class_grid, save_png
from tailgen.utils.io import atomic_write

ARRAYS = ("images", "labels", "seeds", "indices")


def load_shards(shard_dir: Path) -> dict[str, np.ndarray]:
    """Concatenate every shard in ``shard_dir``, ordered by sample index; duplicates are an error."""
    parts = [dict(np.load(p)) for p in sorted(shard_dir.glob("*.npz"))]
    if not parts:
        return {k: np.zeros((0,)) for k in ARRAYS}
    merged = {k: np.concatenate([p[k] for p in parts]) for k in ARRAYS}
    order = np.argsort(merged["indices"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    if len(np.unique(merged["indices"])) != len(merged["indices"]):
        raise RuntimeError(f"duplicate sample indices in {shard_dir}: remove stale shards and run again")
    return merged


def write_samples_npz(path: Path, samples: dict[str, np.ndarray]) -> Path:
    """guided-diffusion layout: arr_0 = images (uint8 NHWC), arr_1 = labels (int64)."""
    return atomic_write(path, lambda tmp: np.savez(
        tmp.open("wb"), arr_0=samples["images"], arr_1=samples["labels"].astype(np.int64),
        seeds=samples["seeds"], indices=samples["indices"]))


def class_sorted_grid(images: np.ndarray, labels: np.ndarray, max_images: int = 100,
                      class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """One labelled row per class (``utils.images.class_grid``), about ``max_images`` samples in all."""
    present = max(1, len(np.unique(labels)))
    return class_grid(images, labels, class_names, per_class=max(1, min(16, max_images // present)))


class SampleWriter(BasePredictionWriter):
    """Prediction writer (``--writer.output_dir DIR``).

    Args:
        output_dir: where ``shards/``, ``samples.npz`` and ``grid.png`` go.
        grid_size: how many samples the grid shows.
    """

    def __init__(self, output_dir: str = "outputs/samples", grid_size: int = 100):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.grid_size = grid_size

    @property
    def shard_dir(self) -> Path:
        return self.output_dir / "shards"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.shard_dir.exists() and any(self.shard_dir.iterdir()):
            self.shard_dir.rename(self.output_dir / time.strftime("shards.old-%Y%m%d-%H%M%S"))
        trainer.strategy.barrier()
        self.shard_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Optional[Any], batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        arrays = {k: prediction[k].cpu().numpy() for k in ARRAYS}
        name = f"rank{trainer.global_rank:03d}_batch{batch_idx:06d}.npz"
        atomic_write(self.shard_dir / name, lambda tmp: np.savez(tmp.open("wb"), **arrays))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return
        samples = load_shards(self.shard_dir)
        write_samples_npz(self.output_dir / "samples.npz", samples)
        grid = class_sorted_grid(samples["images"], samples["labels"], self.grid_size,
                                 getattr(pl_module, "class_names", None))
        save_png(grid, self.output_dir / "grid.png")
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image("samples/grid", [grid], caption=[f"{len(samples['labels'])} samples"])
        print(f"wrote {len(samples['labels'])} samples to {self.output_dir / 'samples.npz'} and {self.output_dir / 'grid.png'}")


def merge_only(output_dir: str) -> Path:
    """Rebuild samples.npz from the shards of an interrupted run (nothing already written is lost)."""
    out = Path(output_dir)
    return write_samples_npz(out / "samples.npz", load_shards(out / "shards"))


__all__ = ["SampleWriter", "load_shards", "write_samples_npz", "merge_only"]
