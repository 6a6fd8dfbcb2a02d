"""What to sample: a dataset of (label, per-sample seed, index) and its DataModule.

Each sample's seed is derived from (base seed, sample index) only (EDM's per-seed generation). Batches are fixed
by the run, not by the device count: batch b always holds indices ``[b*B, (b+1)*B)`` (minus samples a resumed run
already has), and under DDP whole batches are dealt round-robin to the ranks. So a sample is computed in the same
batch, hence bit-identically, whatever the number of devices, and a resumed run recomputes exactly the batches an
uninterrupted run would have (see :func:`batch_plan`).

A cascade's second stage (``low_res``: a first stage's samples.npz) upsamples image k of that file with its label;
its noise comes from ``cascade_seed(seed, k)``, a stream the first stage (``sample_seed``) never uses.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import re
from collections.abc import Iterable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tailgen.models.unet import check_labels
from tailgen.utils import ConfigError
from tailgen.utils.images import from_uint8
from tailgen.utils.io import array_digest

NOT_AN_UPSAMPLER = ("low-resolution images (data.low_res) are given but model.init_args.network is not an upsampler: "
                    "use an upsampler preset (e.g. 64_256_upsampler) or drop data.low_res")
NEEDS_LOW_RES = ("model.init_args.network is an upsampler: it needs the low-resolution images to upsample, set "
                 "data.init_args.low_res to a first stage's samples.npz")

# int before str: `--data.labels 3` on the command line is class 3, not the string "3".
LabelSpec = Union[int, list[int], str]
DEFAULT_LABELS = "uniform"


def sample_seed(base_seed: int, index: int) -> int:
    """A 31-bit seed for sample ``index`` of a run with ``base_seed`` (no overlap between runs)."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def cascade_seed(base_seed: int, index: int) -> int:
    """The seed of sample ``index`` in a cascade's second stage: independent of ``sample_seed(base_seed, index)``,
    so the upsampler's noise never repeats the draws that made its low-resolution input."""
    return int(np.random.SeedSequence([base_seed, index, 1]).generate_state(1)[0] & 0x7FFFFFFF)


def sample_labels(spec: LabelSpec, num_samples: int, num_classes: Optional[int], base_seed: int) -> np.ndarray:
    """Labels per sample index: "uniform" (i.i.d., as guided-diffusion), "balanced" (k mod C),
    an int (every sample that class), or a list of classes (cycled)."""
    if isinstance(spec, str) and re.fullmatch(r"\s*-?\d+\s*", spec):  # labels: "3" in YAML
        spec = int(spec)
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
    if num_classes is not None:
        check_labels(classes, num_classes, fix="fix data.labels")
    return classes[np.arange(num_samples) % classes.size]


def low_res_inputs(low_res: Optional[torch.Tensor], shape: Optional[tuple[int, int, int]], n: Optional[int],
                   device: torch.device | str) -> dict:
    """A network's extra inputs: ``{"low_res": ...}`` for an upsampler taking (C, h, w) = ``shape`` low-res images
    (float N x C x h x w in [-1, 1], one per sample, moved to ``device``), else nothing (``shape`` None);
    ConfigError when an upsampler has none or another network is given one."""
    if shape is None:
        if low_res is not None:
            raise ConfigError(NOT_AN_UPSAMPLER)
        return {}
    if low_res is None:
        raise ConfigError(NEEDS_LOW_RES)
    if tuple(low_res.shape[1:]) != tuple(shape) or (n is not None and len(low_res) != n):
        raise ConfigError(f"the upsampler takes low_res of shape (N, {', '.join(map(str, shape))}) "
                          f"with one image per sample, got {tuple(low_res.shape)} for {n} samples")
    return {"low_res": low_res.to(device, torch.float32)}


def batch_plan(num_samples: int, batch_size: int, skip: Iterable[int] = ()) -> list[np.ndarray]:
    """The batches of a run: batch b = indices ``[b*batch_size, (b+1)*batch_size)`` without those in ``skip``
    (already written by an earlier, interrupted run); batches left empty are dropped."""
    done = np.zeros(num_samples, dtype=bool)
    skip = np.fromiter(skip, dtype=np.int64)
    done[skip[(skip >= 0) & (skip < num_samples)]] = True
    batches = (np.arange(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size))
    return [b[~done[b]] for b in batches if not done[b].all()]


class LabelSeedDataset(Dataset):
    """Item k -> {"label", "seed", "index"} for k in 0..num_samples-1 (k may be an index tensor: a whole batch)."""

    def __init__(self, labels: Sequence[int], base_seed: int):
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.seeds = torch.tensor([sample_seed(base_seed, k) for k in range(len(self.labels))], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, k) -> dict:
        return {"label": self.labels[k], "seed": self.seeds[k], "index": torch.as_tensor(k)}


def read_samples(path: str, key: str = "data.samples") -> tuple[np.ndarray, np.ndarray]:
    """(arr_0 uint8 N×H×W×C, arr_1 int labels or -1 where the file has none) of a samples.npz; one DataError line
    naming the config ``key`` that gave the path otherwise."""
    from pathlib import Path

    from tailgen.utils import DataError
    from tailgen.utils.io import read_npz

    if not Path(path).is_file():
        raise DataError(f"samples file {path} does not exist: run `tailgen predict` first or fix {key}")
    f = read_npz(path, hint=f"{key} must be a samples.npz written by `tailgen predict` (or guided-diffusion)")
    if "arr_0" not in f:
        raise DataError(f"{path} has no arr_0: expected guided-diffusion's samples layout (arr_0 images, arr_1 labels)")
    images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: arr_0 must be uint8 N×H×W×C with C = 1 or 3, got {images.shape} {images.dtype}")
    labels = f["arr_1"] if "arr_1" in f else np.full(len(images), -1)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: arr_1 must hold one integer label per image: {len(images)} images but arr_1 "
                        f"is {labels.shape} {labels.dtype}")
    return images, labels


class SampleFileDataset(Dataset):
    """Item k of an existing ``samples.npz`` (guided-diffusion layout) -> {"images" uint8 HWC, "label", "index"}
    (k may be an index tensor: a whole batch)."""

    def __init__(self, path: str):
        images, labels = read_samples(path)
        self.images = torch.from_numpy(images)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.image_shape = tuple(images.shape[1:])  # H, W, C

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k) -> dict:
        return {"images": self.images[k], "label": self.labels[k], "index": torch.as_tensor(k)}


class LowResDataset(LabelSeedDataset):
    """A cascade's second stage: item k -> {"label", "seed", "index", "low_res"} where ``low_res`` is image k of a
    first stage's samples.npz as float C×h×w in [-1, 1] (``k / 127.5 - 1``, as guided-diffusion's
    ``super_res_sample.py``; the upsampler resizes it to its output size itself), ``label`` its label (-1 where the
    file has none) and ``seed`` = ``cascade_seed(base_seed, k)``. The first ``num_samples`` images are used.

    ``shape``: the upsampler's (C, h, w), checked when given; ``num_classes``: labels must lie in 0..C-1.
    """

    def __init__(self, path: str, num_samples: int, base_seed: int, shape: Optional[tuple[int, int, int]] = None,
                 num_classes: Optional[int] = None):
        from tailgen.utils import DataError

        images, labels = read_samples(path, key="data.low_res")
        h, w, c = images.shape[1:]
        if shape is not None and (c, h, w) != tuple(shape):
            raise DataError(f"data.low_res {path} holds {h}x{w}x{c} images but the upsampler takes "
                            f"{shape[1]}x{shape[2]}x{shape[0]}: give the samples of the matching first stage")
        if num_samples > len(images):
            raise DataError(f"data.low_res {path} holds {len(images)} images but data.num_samples is {num_samples}: "
                            f"set data.num_samples <= {len(images)}")
        images, labels = images[:num_samples], labels[:num_samples]
        if num_classes is not None:
            if (labels < 0).any():
                raise DataError(f"data.low_res {path} has no labels (arr_1) but the upsampler is class-conditional: "
                                "give the first stage's samples.npz with its labels")
            if labels.max() >= num_classes:
                raise DataError(f"data.low_res {path}: label {int(labels.max())} is out of range for the upsampler's "
                                f"{num_classes} classes")
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.seeds = torch.tensor([cascade_seed(base_seed, k) for k in range(len(labels))], dtype=torch.int64)
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 N×h×w×C, converted per batch
        self.low_res_shape = (c, h, w)

    def __getitem__(self, k) -> dict:
        images = self.images[k]
        low_res = from_uint8(images if images.dim() == 4 else images[None])
        return {**super().__getitem__(k), "low_res": low_res if images.dim() == 4 else low_res[0]}


class BatchDataset(Dataset):
    """Item j = the whole batch ``dataset[batches[j]]`` (loaded with ``batch_size=None``: no re-batching)."""

    def __init__(self, dataset: Dataset, batches: list[np.ndarray]):
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> dict:
        return self.dataset[torch.as_tensor(self.batches[j], dtype=torch.int64)]


class RoundRobinSampler(DistributedSampler):
    """Rank r of W takes items r, r+W, r+2W, ... in order; a rank may get none (N < W is fine for predict).
    A ``DistributedSampler`` so Lightning keeps it instead of injecting its own."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.items = list(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class SamplingDataModule(L.LightningDataModule):
    """Drives ``tailgen predict`` / ``tailgen test``: N samples, their labels and per-sample seeds.

    Args:
        num_samples: how many images to generate.
        labels: a class id | a list of class ids | "uniform" | "balanced" (see ``sample_labels``).
        seed: base seed; sample k uses ``sample_seed(seed, k)``.
        batch_size: samples per batch; batch b is always indices [b*batch_size, (b+1)*batch_size).
        num_classes: defaults to the model's ``num_classes``.
        samples: an existing ``samples.npz`` to evaluate in ``tailgen test`` instead of sampling.
        low_res: a first stage's ``samples.npz`` for an upsampler (cascade): sample k upsamples image k of that file
            and keeps its label; the first ``num_samples`` images are upsampled. ``labels`` must then stay at its
            default (another value is a ConfigError: it would be ignored).
    Under DDP every sample is generated exactly once: whole batches go round-robin to the ranks (no padding by
    repetition; in predict a rank may get no batch). The prediction writer reads :meth:`plan` (labels and seeds
    of every index, to verify shards) and calls :meth:`skip` with the indices it already has (resume).
    """

    def __init__(self, num_samples: int = 64, labels: LabelSpec = DEFAULT_LABELS, seed: int = 0, batch_size: int = 16,
                 num_classes: Optional[int] = None, samples: Optional[str] = None, low_res: Optional[str] = None):
        super().__init__()
        # predict with fewer batches than processes leaves some ranks without one; the writer syncs in teardown
        self.allow_zero_length_dataloader_with_multiple_devices = True
        if num_samples < 1 or batch_size < 1:
            raise ConfigError(f"num_samples and batch_size must be >= 1 (got {num_samples}, {batch_size})")
        self.num_samples, self.labels, self.seed, self.batch_size = num_samples, labels, seed, batch_size
        if samples is not None and low_res is not None:
            raise ConfigError("data.samples (evaluate existing samples) and data.low_res (upsample a first stage) "
                              "exclude each other: drop one")
        if low_res is not None and labels != DEFAULT_LABELS:
            raise ConfigError(f"data.labels={labels!r} conflicts with data.low_res: a cascade's labels come from the "
                              f"low-res samples.npz (its arr_1), so leave data.labels at its default ({DEFAULT_LABELS})")
        self.num_classes, self.samples, self.low_res = num_classes, samples, low_res
        self.dataset: Optional[Dataset] = None
        self.skipped: np.ndarray = np.zeros(0, dtype=np.int64)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.samples is not None:
            self.dataset = SampleFileDataset(self.samples)
            return
        num_classes = self.num_classes
        module = self.trainer.lightning_module if self.trainer is not None else None
        if num_classes is None and module is not None:
            num_classes = getattr(module, "num_classes", None)
        shape = getattr(module, "low_res_shape", None)
        if module is not None and self.low_res is not None and shape is None:
            raise ConfigError(NOT_AN_UPSAMPLER)
        if shape is not None and self.low_res is None:
            raise ConfigError(NEEDS_LOW_RES)
        if self.low_res is not None:
            self.dataset = LowResDataset(self.low_res, self.num_samples, self.seed, shape, num_classes)
            return
        labels = sample_labels(self.labels, self.num_samples, num_classes, self.seed)
        self.dataset = LabelSeedDataset(labels, self.seed)

    def plan(self) -> dict[str, np.ndarray]:
        """Labels and seeds of every sample index 0..N-1 (what a shard of this run must contain)."""
        if self.dataset is None:
            self.setup()
        if not isinstance(self.dataset, LabelSeedDataset):
            raise ConfigError("data.samples is set: tailgen predict samples new images; drop data.samples")
        plan = {"labels": self.dataset.labels.numpy(), "seeds": self.dataset.seeds.numpy()}
        if isinstance(self.dataset, LowResDataset):  # the images to upsample are part of what the samples are
            plan["low_res"] = array_digest(self.dataset.images)
        return plan

    def skip(self, indices: Iterable[int]) -> None:
        """Leave these sample indices out of the predict batches (an earlier run already wrote them)."""
        self.skipped = np.fromiter(indices, dtype=np.int64)

    def _loader(self, stage: str) -> DataLoader:
        if self.dataset is None:
            self.setup()
        skip = self.skipped if stage == "predict" else ()
        batches = BatchDataset(self.dataset, batch_plan(len(self.dataset), self.batch_size, skip))
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            world = self.trainer.world_size
            if stage == "test" and len(batches) < world:
                # metrics are synchronised at epoch end: a rank without a batch would never reach that point
                raise ConfigError(f"tailgen test with {world} processes needs at least {world} batches, got "
                                  f"{len(batches)} (num_samples={len(self.dataset)}, batch_size={self.batch_size}): "
                                  "lower data.batch_size or trainer.devices")
            sampler = RoundRobinSampler(batches, num_replicas=world, rank=self.trainer.global_rank)
        return DataLoader(batches, batch_size=None, shuffle=False, sampler=sampler)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
