"""``tailgen``: the command line (LightningCLI) for fit / predict / test.

    tailgen predict --config configs/fashion/default.yaml --data.num_samples 64 --writer.output_dir out
    tailgen test    --config configs/fashion/eval.yaml --model.guidances.tail.init_args.scale=0.5
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import tailgen.guidance  # noqa: F401  (registers guidance classes for short class_path names)
from tailgen.module.writer import SampleWriter


class LogConfigCallback(SaveConfigCallback):
    """Saves config.yaml into the log dir and, on W&B, the whole resolved config (rank 0 only)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class TailgenCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The sample writer is always there on predict; its options are --writer.*.
        parser.add_lightning_class_args(SampleWriter, "writer")


def main(args: Optional[list[str]] = None) -> None:
    # Console scripts do not put the working directory on sys.path; user guidances live there.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    TailgenCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"inference_mode": False},
        args=args,
    )


if __name__ == "__main__":
    main()
