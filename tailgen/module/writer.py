"""Writes predicted samples: one verified shard per batch, then ``samples.npz`` + ``samples.json`` + ``grid.png``,
beside ``config.yaml`` (the run's resolved config, written once the folder is this config's).

``samples.npz`` follows guided-diffusion's format (``arr_0`` uint8 N×H×W×C, ``arr_1`` int64 labels) so ADM's
evaluator reads it; ``seeds`` and ``indices`` are stored beside them. Rerunning the same command resumes: every
finished shard that verifies (:mod:`tailgen.module.shards`) is reused and only the missing batches are sampled.

The config hash identifies what the samples are, not how they were computed. It covers the resolved model config
(network preset / flags, classifier, unconditional model, diffusion flags, sampler, eta, clip_denoised, guidances
and their arguments, num_classes; checkpoint *paths* are replaced by the weights' content), the SHA-256 of every
weight the module holds, ``trainer.precision``, and the labels and seeds of all N samples (so num_samples, labels,
seed and num_classes); for a cascade's second stage also the content of the low-resolution input images. Left out:
batch size, device count and strategy (a sample's batch is fixed by the run's batch plan, see ``sampling_data``),
accelerator, progress bars, ``evaluation`` and the output folder.

On ``tailgen test`` with ``evaluation.keep_samples`` the same writer keeps the sampled images beside metrics.json
(the run folder, :mod:`tailgen.module.run_folder`): shards while testing, samples.npz + samples.json at the end (no
grid of its own: the test writes one); not resumed (each test samples everything, its metrics need all samples).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

import tailgen
from tailgen.module import shards
from tailgen.utils import ConfigError, SamplingError, TailgenError
from tailgen.utils.images import class_grid, save_png
from tailgen.utils.io import array_digest, atomic_write, file_digest

_NOT_SAMPLING = ("progress", "evaluation")
# Batches come whole from the datamodule (batch_size=None); the writer reads indices from the batch itself.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched")
# A finished folder leaves nothing to sample; the writer says so in one line.
warnings.filterwarnings("ignore", message="Total length of `DataLoader` across ranks is zero")  # model init_args that do not change a sample


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor in ``module.state_dict()`` (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _drop_checkpoint_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_checkpoint_paths(v) for k, v in value.items() if k != "checkpoint"}
    if isinstance(value, list):
        return [_drop_checkpoint_paths(v) for v in value]
    return value


def model_config(pl_module: L.LightningModule, run_config: Optional[dict]) -> dict:
    """The sampling-relevant model config: the CLI's resolved ``model`` section, or (outside the CLI) the
    module's hyperparameters and guidances."""
    if run_config is not None and "model" in run_config:
        model = json.loads(json.dumps(run_config["model"], default=str))
        model.get("init_args", {}).pop("progress", None)
        model.get("init_args", {}).pop("evaluation", None)
        return _drop_checkpoint_paths(model)
    hparams = {k: v for k, v in dict(getattr(pl_module, "hparams", {})).items() if k not in _NOT_SAMPLING}
    guidances = {name: [type(g).__qualname__, vars(g)] for name, g in getattr(pl_module, "guidances", {}).items()}
    described = {"class": type(pl_module).__qualname__, "hparams": hparams, "guidances": guidances}
    return json.loads(json.dumps(described, default=repr, sort_keys=True))


def sample_shape(pl_module: L.LightningModule) -> Optional[tuple]:
    """One sample as the writer stores it (H, W, C), from the module's ``image_shape`` (C, H, W) if it has one."""
    shape = tuple(getattr(pl_module, "image_shape", ()) or ())
    return (*shape[1:], shape[0]) if len(shape) == 3 else None


def class_sorted_grid(images: np.ndarray, labels: np.ndarray, max_images: int = 100,
                      class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """One labelled row per class (``utils.images.class_grid``), about ``max_images`` samples in all."""
    present = max(1, len(np.unique(labels)))
    return class_grid(images, labels, class_names, per_class=max(1, min(16, max_images // present)))


class SampleWriter(BasePredictionWriter):
    """Prediction writer (``--writer.output_dir DIR``); a rerun of the same command resumes.

    Args:
        output_dir: where ``shards/``, ``samples.npz``, ``samples.json`` and ``grid.png`` go.
        grid_size: how many samples the grid shows.
        overwrite: replace samples or shards of another configuration found in ``output_dir`` (otherwise
            such a folder is refused before sampling starts).
    """

    def __init__(self, output_dir: str = "outputs/samples", grid_size: int = 100, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.grid_size = grid_size
        self.overwrite = overwrite
        self.run_config: Optional[dict] = None  # the CLI's resolved config (set by `tailgen predict` / `test`)
        self.config_text: Optional[str] = None  # the same as YAML, written to config.yaml
        self._run: Optional[dict] = None
        self._stage = "predict"

    @property
    def shard_dir(self) -> Path:
        return self.output_dir / "shards"

    # ------------------------------------------------------------------------------------------------ start

    def identity(self, trainer: L.Trainer, pl_module: L.LightningModule, plan: dict[str, np.ndarray]) -> dict:
        """What the config hash covers (see the module docstring)."""
        return {"format": 1, "model": model_config(pl_module, self.run_config), "weights": weights_digest(pl_module),
                "precision": str(trainer.precision), "num_samples": len(plan["labels"]),
                "labels_and_seeds": array_digest(plan["labels"], plan["seeds"]),
                **({"low_res": plan["low_res"]} if "low_res" in plan else {})}  # a cascade's input images

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, plan: dict[str, np.ndarray]) -> dict:
        """Rank 0: check the folder, claim it for this config, find the verified shards. Nothing is sampled yet."""
        key = "writer.output_dir" if self._stage == "predict" else "model.init_args.evaluation.init_args.output"
        shards.check_writable(self.output_dir, key)
        identity = self.identity(trainer, pl_module, plan)
        config_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        if self.overwrite:
            shards.clear_outputs(self.output_dir)
        shards.refuse_foreign(self.output_dir, config_hash, key)
        n = len(plan["labels"])
        if shards.finished(self.output_dir, config_hash):
            shutil.rmtree(self.shard_dir, ignore_errors=True)  # left if the last run stopped right after samples.json
            if self._stage == "predict" and not (self.output_dir / shards.CONFIG).exists():
                self._write_config()
            return {"hash": config_hash, "identity": identity, "done": np.arange(n), "finished": True}
        for name in (shards.SAMPLES, shards.PROVENANCE, shards.GRID):  # stale output of this config: redone below
            (self.output_dir / name).unlink(missing_ok=True)
        if self._stage == "test":  # not resumed: every sample is drawn again
            shutil.rmtree(self.shard_dir, ignore_errors=True)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        shards.write_json(self.shard_dir / shards.RUN_FILE, {"config_hash": config_hash, "identity": identity})
        if self._stage == "predict":
            self._write_config()
        done, notes = shards.scan_shards(self.shard_dir, config_hash, plan, sample_shape(pl_module))
        for note in notes:
            print(f"tailgen: dropped shard {note}; its samples are sampled again", file=sys.stderr)
        if len(done["indices"]):
            print(f"resuming: {len(done['indices'])} of {n} samples already in {self.shard_dir}; "
                  f"sampling the other {n - len(done['indices'])}")
        return {"hash": config_hash, "identity": identity, "done": done["indices"], "finished": False}

    def _write_config(self) -> None:
        """config.yaml: the resolved config of the run (the CLI's; nothing outside the CLI)."""
        if self.config_text is not None:
            atomic_write(self.output_dir / shards.CONFIG, lambda tmp: tmp.write_text(self.config_text))

    def _keeps_test_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """tailgen test with evaluation.keep_samples on sampled (not loaded) images: output beside metrics.json."""
        if not getattr(getattr(pl_module, "evaluation", None), "keep_samples", False):
            return False
        if getattr(getattr(trainer.datamodule, "dataset", None), "image_shape", None) is not None:
            rank_zero_info("evaluation.keep_samples: the samples come from data.samples; nothing more is written")
            return False
        self.output_dir = pl_module.metrics_path().parent
        return True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = stage
        if stage == "test" and not self._keeps_test_samples(trainer, pl_module) or stage not in ("predict", "test"):
            return
        datamodule = trainer.datamodule
        if not (hasattr(datamodule, "plan") and hasattr(datamodule, "skip")):
            raise ConfigError("SampleWriter needs a datamodule with plan() and skip(), e.g. "
                              "tailgen.module.sampling_data.SamplingDataModule")
        plan = datamodule.plan()
        result: dict = {}
        if trainer.is_global_zero:
            try:
                result = self._prepare(trainer, pl_module, plan)
            except Exception as exc:  # every rank must stop (a rank waiting in broadcast would hang)
                error = exc if isinstance(exc, TailgenError) else SamplingError(f"rank 0 failed: {exc!r}")
                trainer.strategy.broadcast({"error": error}, src=0)
                raise
        result = trainer.strategy.broadcast(result, src=0)
        if "error" in result:
            raise result["error"]
        self._run = {**result, "plan": plan}
        if stage == "predict":
            datamodule.skip(result["done"])

    # ------------------------------------------------------------------------------------------------ batches

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Optional[Any], batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        arrays = {k: prediction[k].cpu().numpy() for k in shards.ARRAYS}
        shards.write_shard(self.shard_dir, arrays, self._run["hash"])

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._run is not None and not self._run["finished"] and isinstance(outputs, dict):
            self.write_on_batch_end(trainer, pl_module, outputs, None, batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------------------------------------------ end

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Runs on every rank, also on ranks that got no batch (Lightning skips their predict loop)."""
        if stage not in ("predict", "test") or self._run is None:
            return
        run, self._run = self._run, None
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return
        n = len(run["plan"]["labels"])
        if run["finished"]:
            what = "nothing to do" if stage == "predict" else "samples not written again"
            print(f"{what}: {self.output_dir / shards.SAMPLES} already holds these {n} samples "
                  f"(config {shards.short(run['hash'])}, see {shards.PROVENANCE})")
            return
        samples, notes = shards.scan_shards(self.shard_dir, run["hash"], run["plan"], sample_shape(pl_module),
                                            remove_bad=False)
        if len(samples["indices"]) != n or notes:
            missing = np.setdiff1d(np.arange(n), samples["indices"])
            raise SamplingError(f"{self.shard_dir} holds {len(samples['indices'])} of {n} verified samples "
                                f"(missing e.g. {missing[:5].tolist()}; {'; '.join(notes[:3])}): run the same command "
                                "again to sample the rest")
        path = shards.write_samples_npz(self.output_dir / shards.SAMPLES, samples)
        shards.write_json(self.output_dir / shards.PROVENANCE, self.provenance(trainer, run, path))
        shutil.rmtree(self.shard_dir)  # everything is in samples.npz now
        if stage == "test":  # the test's own class grid is beside metrics.json already
            print(f"wrote {n} samples to {path} (+ {shards.PROVENANCE}, config {shards.short(run['hash'])})")
            return
        grid = class_sorted_grid(samples["images"], samples["labels"], self.grid_size,
                                 getattr(pl_module, "class_names", None))
        save_png(grid, self.output_dir / shards.GRID)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image("samples/grid", [grid], caption=[f"{n} samples"])
        print(f"wrote {n} samples to {path} (+ {shards.PROVENANCE}, config {shards.short(run['hash'])}) "
              f"and {self.output_dir / shards.GRID}")

    def provenance(self, trainer: L.Trainer, run: dict, samples_path: Path) -> dict:
        """samples.json: what made samples.npz, enough to reproduce or to refuse mixing it with another run."""
        datamodule = trainer.datamodule
        plan = run["plan"]
        return {
            "config_hash": run["hash"],
            "command": self._stage,
            "num_samples": len(plan["labels"]),
            "indices": [0, len(plan["labels"]) - 1],
            "base_seed": getattr(datamodule, "seed", None),
            "labels": getattr(datamodule, "labels", None),
            "seeds": "per sample in samples.npz['seeds'] ("
                     + ("cascade_seed" if getattr(datamodule, "low_res", None) else "sample_seed") + "(base_seed, index))",
            "samples_sha256": file_digest(samples_path),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"tailgen": tailgen.__version__, "torch": torch.__version__, "lightning": L.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
            "hashed": run["identity"],
            "resolved_config": self.run_config,
            "ran_with": {"batch_size": getattr(datamodule, "batch_size", None), "world_size": trainer.world_size,
                         "accelerator": type(trainer.accelerator).__name__},
        }


__all__ = ["SampleWriter", "class_sorted_grid", "weights_digest", "model_config"]
