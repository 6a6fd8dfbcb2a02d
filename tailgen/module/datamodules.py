"""Training DataModules. Datasets live in memory, and batches are gathered by one tensor index per batch
(``BatchSampler`` -> ``dataset[list_of_indices]``), which on a 2-core CPU is ~100x cheaper than collating
single items. :class:`GeneratedSamplesDataModule` trains on images the diffusion model generated (data-free
distillation of PPAP experts, ``tailgen.module.distill``)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from tailgen.data import toy
from tailgen.data.fashion_mnist import FashionMNIST, to_model_range
from tailgen.utils.errors import DataError


class TensorPairs(Dataset):
    """(x, y) tensors; ``ds[list_of_indices]`` returns a whole batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, idx):
        return self.x[idx], self.y[idx]


def batch_loader(ds: Dataset, batch_size: int, shuffle: bool, drop_last: bool, num_workers: int = 0,
                 seed: int | None = None) -> DataLoader:
    """A DataLoader that indexes ``ds`` with whole index lists (no per-item collation)."""
    if shuffle:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        sampler = RandomSampler(ds, generator=g)
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None,
                      num_workers=num_workers, persistent_workers=num_workers > 0)


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST train split for fitting, a fixed slice of the test split for validation.

    Args:
        root: folder with the IDX .gz files (None: ``$TAILGEN_FASHION_MNIST`` or the Debian package folder).
        batch_size: training batch size.
        image_size: 28 (native), 32 (padded with black) or 14 / 7 (area-downsampled, rounded to uint8 levels:
            a cascade's first stage, `tailgen.data.resize`).
        num_workers: DataLoader workers (0 is right here: data is an in-memory tensor).
        val_size: number of test images used for validation (the first ``val_size``; 0 disables validation).
        val_batch_size: validation batch size (defaults to ``batch_size``).
    """

    def __init__(self, root: str | None = None, batch_size: int = 64, image_size: int = 28, num_workers: int = 0,
                 val_size: int = 2000, val_batch_size: int | None = None):
        super().__init__()
        self.root, self.batch_size, self.image_size = root, batch_size, image_size
        self.num_workers, self.val_size = num_workers, val_size
        self.val_batch_size = val_batch_size or batch_size
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = FashionMNIST("train", self.root, self.image_size)
        if self.val_set is None and self.val_size > 0:
            test = FashionMNIST("test", self.root, self.image_size)
            n = min(self.val_size, len(test))
            self.val_set = TensorPairs(test.images[:n], test.labels[:n])

    def train_dataloader(self) -> DataLoader:
        return batch_loader(self.train_set, self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return batch_loader(self.val_set, self.val_batch_size, shuffle=False, drop_last=False)


class GeneratedSamplesDataModule(FashionMNISTDataModule):
    """Generated images for fitting (data-free: their labels are passed along but a distillation does not use
    them), a fixed slice of the real Fashion-MNIST test split (with labels) for validation.

    The training images are ``arr_0`` of a ``samples.npz`` written by ``tailgen predict`` (uint8 N×H×W×1, read by
    :func:`~tailgen.module.sampling_data.read_samples`), scaled as the real images (x / 127.5 - 1, padded to
    ``image_size``). A missing or malformed file, colour images or fewer images than one batch: one DataError line.

    Args:
        samples: the ``samples.npz`` of generated images, e.g. ``runs/ppap_data/samples.npz``.
        root, batch_size, image_size, num_workers, val_size, val_batch_size: as :class:`FashionMNISTDataModule`.
    """

    def __init__(self, samples: str, root: str | None = None, batch_size: int = 128, image_size: int = 28,
                 num_workers: int = 0, val_size: int = 2000, val_batch_size: int | None = None):
        super().__init__(root, batch_size, image_size, num_workers, val_size, val_batch_size)
        self.samples = samples

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            from tailgen.module.sampling_data import read_samples

            key = "data.init_args.samples"
            images, labels = read_samples(self.samples, key=key)
            n, h, w, c = images.shape
            if c != 1:
                raise DataError(f"{key} {self.samples} holds {h}x{w}x{c} images; Fashion-MNIST is grayscale "
                                "(H×W×1): give samples of a Fashion-MNIST model")
            if n < self.batch_size:
                raise DataError(f"{key} {self.samples} holds {n} images, fewer than one batch "
                                f"(data.init_args.batch_size {self.batch_size}): sample more or lower the batch size")
            try:
                x = to_model_range(images[..., 0], self.image_size)
            except DataError as error:
                raise DataError(f"{key} {self.samples} holds {h}x{w} images: {error}") from None
            self.train_set = TensorPairs(x, torch.as_tensor(labels, dtype=torch.int64))
        super().setup(stage)


class ToyDataModule(L.LightningDataModule):
    """Points of the 2-D toy mixture (:mod:`tailgen.data.toy`, model units) with uniform labels.

    ``num_samples`` training points are drawn once from ``seed``; validation uses ``val_samples`` fresh points
    (seed + 1). ``steps_per_epoch`` > 0 makes one epoch a fixed number of batches, resampled with replacement
    each epoch (handy for step-based schedules); 0 iterates the training set once per epoch.
    """

    def __init__(self, num_samples: int = 60000, batch_size: int = 1024, seed: int = 0, val_samples: int = 5000):
        super().__init__()
        self.num_samples, self.batch_size, self.seed, self.val_samples = num_samples, batch_size, seed, val_samples
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            x, y, _ = toy.sample(self.num_samples, generator=torch.Generator().manual_seed(self.seed))
            self.train_set = TensorPairs(x, y)
            x, y, _ = toy.sample(self.val_samples, generator=torch.Generator().manual_seed(self.seed + 1))
            self.val_set = TensorPairs(x, y)

    def train_dataloader(self) -> DataLoader:
        return batch_loader(self.train_set, self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return batch_loader(self.val_set, self.batch_size, shuffle=False, drop_last=False)
