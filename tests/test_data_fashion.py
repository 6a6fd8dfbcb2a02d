import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tailgen.data.fashion_mnist import (
    CLASS_NAMES, DEFAULT_ROOT, FashionMNIST, load_fashion_mnist, to_model_range,
)
from tailgen.utils import DataError


def _write_idx(path: Path, magic: int, arr: np.ndarray):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _tiny_folder(tmp_path, n=5, prefix="train", img_magic=0x803):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labs = np.arange(n) % 10
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", img_magic, imgs)
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", 0x801, labs)
    return imgs, labs


@pytest.mark.skipif(not Path(DEFAULT_ROOT, "t10k-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_real_files():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9 and np.bincount(y).tolist() == [1000] * 10
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    assert len(CLASS_NAMES) == 10


def test_missing_dir_message(tmp_path):
    with pytest.raises(DataError) as e:
        load_fashion_mnist("train", root=tmp_path / "nope")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path / "nope") in msg


def test_env_override(tmp_path, monkeypatch):
    imgs, labs = _tiny_folder(tmp_path, prefix="t10k")
    monkeypatch.setenv("TAILGEN_FASHION_MNIST", str(tmp_path))
    x, y = load_fashion_mnist("test")
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, labs)


def test_handmade_idx_and_dataset(tmp_path):
    imgs, labs = _tiny_folder(tmp_path, n=7)
    ds = FashionMNIST("train", root=tmp_path, image_size=32)
    assert len(ds) == 7
    x, y = ds[3]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and int(y) == 3
    assert x[0, :2].eq(-1).all() and x[0, :, :2].eq(-1).all()  # padding is black
    torch.testing.assert_close(x[0, 2:30, 2:30], torch.from_numpy(imgs[3]).float() / 127.5 - 1)
    assert to_model_range(imgs, 28).shape == (7, 1, 28, 28)


def test_bad_magic_and_truncation(tmp_path):
    _tiny_folder(tmp_path, img_magic=0x801)
    with pytest.raises(DataError, match="magic"):
        load_fashion_mnist("train", root=tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 5, 28, 28) + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist("train", root=tmp_path)
