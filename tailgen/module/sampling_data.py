"""What to sample: a dataset of (label, per-sample seed, index) and its DataModule.

Each sample's seed is derived from (base seed, sample index) only, so the sample for index k is the
same whatever the batch size or the number of devices (EDM's per-seed generation).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from tailgen.utils import ConfigError

LabelSpec = Union[str, int, list[int]]


def sample_seed(base_seed: int, index: int) -> int:
    """A 31-bit seed for sample ``index`` of a run with ``base_seed`` (no overlap between runs)."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def sample_labels(spec: LabelSpec, num_samples: int, num_classes: Optional[int], base_seed: int) -> np.ndarray:
    """Labels per sample index: "uniform" (i.i.d., as guided-diffusion), "balanced" (k mod C),
    an int (every sample that class), or a list of classes (cycled)."""
    if isinstance(spec, str):
        if num_classes is None:
            raise ConfigError(f"labels={spec!r} needs num_classes (set data.num_classes or use a class-conditional model)")
        if spec == "uniform":
            return np.random.default_rng([base_seed, 7]).integers(0, num_classes, size=num_samples)
        if spec == "balanced":
            return np.arange(num_samples) % num_classes
        raise ConfigError(f"unknown labels spec {spec!r}: use 'uniform', 'balanced', a class id or a list of class ids")
    classes = np.atleast_1d(np.asarray(spec, dtype=np.int64))
    if classes.size == 0:
        raise ConfigError("labels is an empty list: give at least one class id")
    if num_classes is not None and (classes.min() < 0 or classes.max() >= num_classes):
        bad = classes[(classes < 0) | (classes >= num_classes)]
        raise ConfigError(f"label {int(bad[0])} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    return classes[np.arange(num_samples) % classes.size]


class LabelSeedDataset(Dataset):
    """Item k -> {"label", "seed", "index"} for k in 0..num_samples-1."""

    def __init__(self, labels: Sequence[int], base_seed: int):
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.seeds = torch.tensor([sample_seed(base_seed, k) for k in range(len(self.labels))], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, k: int) -> dict:
        return {"label": self.labels[k], "seed": self.seeds[k], "index": torch.tensor(k)}


class SampleFileDataset(Dataset):
    """Item k of an existing ``samples.npz`` (guided-diffusion layout) -> {"images" uint8 HWC, "label", "index"}."""

    def __init__(self, path: str):
        from pathlib import Path

        from tailgen.utils import DataError
        from tailgen.utils.io import read_npz

        if not Path(path).is_file():
            raise DataError(f"samples file {path} does not exist: run `tailgen predict` first or fix data.samples")
        f = read_npz(path, hint="data.samples must be a samples.npz written by `tailgen predict` (or guided-diffusion)")
        if "arr_0" not in f:
            raise DataError(f"{path} has no arr_0: expected guided-diffusion's samples layout (arr_0 images, arr_1 labels)")
        images = f["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"{path}: arr_0 must be uint8 N×H×W×C with C = 1 or 3, got {images.shape} {images.dtype}")
        labels = f["arr_1"] if "arr_1" in f else np.full(len(images), -1)
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: arr_1 must hold one integer label per image: {len(images)} images but arr_1 "
                            f"is {labels.shape} {labels.dtype}")
        self.images = torch.from_numpy(images)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.image_shape = tuple(images.shape[1:])  # H, W, C

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> dict:
        return {"images": self.images[k], "label": self.labels[k], "index": torch.tensor(k)}


class SamplingDataModule(L.LightningDataModule):
    """Drives ``tailgen predict`` / ``tailgen test``: N samples, their labels and per-sample seeds.

    Args:
        num_samples: how many images to generate.
        labels: "uniform" | "balanced" | a class id | a list of class ids (see ``sample_labels``).
        seed: base seed; sample k uses ``sample_seed(seed, k)``.
        batch_size: samples per batch (per device).
        num_classes: defaults to the model's ``num_classes``.
        samples: an existing ``samples.npz`` to evaluate in ``tailgen test`` instead of sampling.
    Under DDP every sample is generated exactly once (no padding by repetition, also in test).
    """

    def __init__(self, num_samples: int = 64, labels: LabelSpec = "uniform", seed: int = 0, batch_size: int = 16,
                 num_classes: Optional[int] = None, samples: Optional[str] = None):
        super().__init__()
        if num_samples < 1 or batch_size < 1:
            raise ConfigError(f"num_samples and batch_size must be >= 1 (got {num_samples}, {batch_size})")
        self.num_samples, self.labels, self.seed, self.batch_size = num_samples, labels, seed, batch_size
        self.num_classes, self.samples = num_classes, samples
        self.dataset: Optional[Dataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.samples is not None:
            self.dataset = SampleFileDataset(self.samples)
            return
        num_classes = self.num_classes
        if num_classes is None and self.trainer is not None:
            num_classes = getattr(self.trainer.lightning_module, "num_classes", None)
        labels = sample_labels(self.labels, self.num_samples, num_classes, self.seed)
        self.dataset = LabelSeedDataset(labels, self.seed)

    def _loader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(self.dataset, num_replicas=self.trainer.world_size,
                                                   rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler)

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
