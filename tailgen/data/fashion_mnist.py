"""Fashion-MNIST from IDX gz files (Debian's ``dataset-fashion-mnist`` or any folder with the same files).

File layout (Xiao et al. 2017, same format as MNIST):

* images ``<split>-images-idx3-ubyte.gz``: big-endian header ``0x00000803, N, 28, 28`` then N*28*28 uint8;
* labels ``<split>-labels-idx1-ubyte.gz``: big-endian header ``0x00000801, N`` then N uint8 in 0..9;

with ``<split>`` = ``train`` (60,000) or ``t10k`` (10,000, our "test").
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tailgen.data.resize import area_downsample
from tailgen.utils.errors import DataError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "TAILGEN_FASHION_MNIST"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)

_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim
_PREFIX = {"train": "train", "test": "t10k"}


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$TAILGEN_FASHION_MNIST``, else the Debian package folder."""
    if root is None:
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(root)


def _file_names(split: str) -> tuple[str, str]:
    if split not in _PREFIX:
        raise DataError(f"Unknown Fashion-MNIST split {split!r}; use 'train' or 'test'.")
    p = _PREFIX[split]
    return f"{p}-images-idx3-ubyte.gz", f"{p}-labels-idx1-ubyte.gz"


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one gzip'd IDX file, checking the magic number and that the payload fits the header."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # missing handled by caller; here: corrupt gzip
        raise DataError(f"Cannot read IDX file {path}: {e}. Reinstall with `{INSTALL_HINT}`.") from e
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"IDX file {path} is truncated ({len(data)} bytes, header needs {header_len}).")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise DataError(f"IDX file {path} has magic number 0x{got:08x}, expected 0x{magic:08x}; "
                        "is it an images/labels file of the right kind?")
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    count = int(np.prod(dims))
    if len(data) - header_len != count:
        raise DataError(f"IDX file {path}: header says {dims} ({count} bytes) but payload has "
                        f"{len(data) - header_len} bytes (truncated or corrupt).")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one split: ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    ``root`` defaults to ``$TAILGEN_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``.
    Raises one :class:`DataError` naming the folder and the install command when files are absent.
    """
    folder = resolve_root(root)
    img_name, lab_name = _file_names(split)
    missing = [n for n in (img_name, lab_name) if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST {split} files not found in {folder} (missing: {', '.join(missing)}). "
            f"Install them with `{INSTALL_HINT}` (files land in {DEFAULT_ROOT}), or point "
            f"${ENV_VAR} / root= at a folder holding the IDX .gz files."
        )
    images = _read_idx(folder / img_name, _IMAGES_MAGIC, 3)
    labels = _read_idx(folder / lab_name, _LABELS_MAGIC, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST {split} in {folder}: {images.shape[0]} images but {labels.shape[0]} labels.")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"Fashion-MNIST {split} labels in {folder} outside 0..{NUM_CLASSES - 1}.")
    return images, labels


def to_model_range(images_uint8: torch.Tensor | np.ndarray, image_size: int = 28) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, S, S) in [-1, 1] (x/127.5 - 1): zero-padded with -1 (black) to S > H, or
    area-downsampled to S dividing H and rounded to uint8 levels (``tailgen.data.resize.area_downsample``: the
    images of a cascade's first stage are the low_res its upsampler is trained on)."""
    x = torch.as_tensor(images_uint8).float().div(127.5).sub(1.0).unsqueeze(1)
    h = x.shape[-1]
    if image_size < h and image_size > 0 and h % image_size == 0:
        return area_downsample(x, image_size).contiguous()
    if image_size != h:
        if image_size < h or (image_size - h) % 2:
            raise DataError(f"image_size must be {h}, {h} plus an even padding, or a divisor of {h} "
                            f"(area downsampling), got {image_size}.")
        p = (image_size - h) // 2
        x = torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)
    return x.contiguous()


class FashionMNIST(Dataset):
    """Fashion-MNIST as float images in [-1, 1] of shape (1, S, S) (S = 28, padded 32, or area-downsampled 14 or 7)
    and int64 labels.

    The whole split is converted once to a float tensor in memory (60k x 1 x 32 x 32 x 4 B = 246 MB at 32,
    188 MB at 28), so ``__getitem__`` is an index.
    """

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, image_size: int = 28):
        images, labels = load_fashion_mnist(split, root)
        self.images = to_model_range(images, image_size)
        self.labels = torch.from_numpy(labels)
        self.image_size = image_size

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]
