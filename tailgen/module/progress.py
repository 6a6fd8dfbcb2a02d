"""``SampleProgressBar``: the one progress bar of ``tailgen predict`` / ``tailgen test``.

It counts samples (not batches) done out of the run's total and shows the sampler step of the current batch::

    sampling:  37%|███▋      | 24/64 [00:41<01:02, step 118/250]

Lightning's progress-bar setting governs it: the CLI installs it in place of Lightning's bar when
``trainer.enable_progress_bar`` is true (the default), and ``--trainer.enable_progress_bar=false`` silences it.
While it is installed, ``GuidedDiffusion`` reports every sampler step to it (``step_hook``) instead of opening a
per-batch step bar of its own.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm


def _num_samples(dataloaders: Any) -> Optional[int]:
    """Samples this rank's loaders will produce: items are whole batches (``BatchDataset``), dealt to ranks by
    the loader's sampler (``RoundRobinSampler.items``); other datasets count one sample per item."""
    loaders = dataloaders if isinstance(dataloaders, (list, tuple)) else [dataloaders]
    total = 0
    try:
        for loader in loaders:
            dataset = loader.dataset
            batches = getattr(dataset, "batches", None)
            if batches is None:
                total += len(dataset)
                continue
            items = getattr(loader.sampler, "items", range(len(batches)))
            total += sum(len(batches[j]) for j in items)
    except (TypeError, AttributeError):
        return None
    return total


class SampleProgressBar(ProgressBar):
    """One tqdm bar over samples for predict / test, with the current sampler step as its postfix."""

    def __init__(self) -> None:
        super().__init__()
        self.bar: Optional[tqdm] = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def print(self, *args: Any, **kwargs: Any) -> None:  # keep printed lines off the bar's line
        (self.bar.write if self.bar is not None else print)(" ".join(map(str, args)), **kwargs)

    def _start(self, pl_module: L.LightningModule, desc: str, dataloaders: Any) -> None:
        if not self.is_enabled:
            return
        self.bar = tqdm(total=_num_samples(dataloaders), desc=desc, unit="sample", dynamic_ncols=True,
                        file=sys.stderr, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        pl_module.step_hook = self._on_step

    def _on_step(self, info: dict) -> None:
        if self.bar is not None and "num_steps" in info:
            self.bar.set_postfix_str(f"step {info['step'] + 1}/{info['num_steps']}", refresh=True)

    def _advance(self, batch: Any) -> None:
        if self.bar is not None:
            label = batch.get("label") if isinstance(batch, dict) else None
            self.bar.update(len(label) if label is not None else 1)

    def _stop(self, pl_module: L.LightningModule) -> None:
        pl_module.step_hook = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module, "sampling", trainer.predict_dataloaders)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._advance(batch)

    # closed at epoch end (callbacks run before the module's and the writer's end hooks): the lines printed
    # after it ("wrote N samples ...", the metrics table) start on a line of their own
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module, "evaluating", trainer.test_dataloaders)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._advance(batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop(pl_module)  # the error line then starts on a line of its own

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)


__all__ = ["SampleProgressBar"]
