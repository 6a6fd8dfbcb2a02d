"""Reference readers (.npz ref batch, image folder) and the content-keyed feature cache."""

import numpy as np
import pytest
import torch

from tailgen.metrics.features import FeatureExtractor
from tailgen.metrics.reference import build_reference, cached_features, read_image_folder, read_reference_npz
from tailgen.utils import ConfigError, DataError


class CountingExtractor(FeatureExtractor):
    """Pool = per-channel means and stds; counts how many images it saw."""

    provides = ("pool",)

    def __init__(self, tag="a"):
        super().__init__(batch_size=16)
        self.tag, self.seen = tag, 0

    def _identity(self):
        return f"counting/{self.tag}"

    def _extract(self, x):
        self.seen += x.shape[0]
        x = x.float()
        return {"pool": torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)}


def _images(n=40, seed=0, c=3, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


def test_cache_hit_and_miss(tmp_path):
    images, ext = _images(), CountingExtractor()
    first = cached_features(ext, images, cache_dir=tmp_path)
    assert ext.seen == 40 and len(list(tmp_path.glob("*.npz"))) == 1
    again = cached_features(ext, images, cache_dir=tmp_path)
    assert ext.seen == 40  # hit: the network did not run
    torch.testing.assert_close(first["pool"], again["pool"])
    cached_features(ext, _images(seed=1), cache_dir=tmp_path)  # other images: miss
    assert ext.seen == 80
    other = CountingExtractor("b")  # other network identity: miss
    cached_features(other, images, cache_dir=tmp_path)
    assert other.seen == 40 and len(list(tmp_path.glob("*.npz"))) == 3
    cached_features(ext, images, cache_dir=None)  # no cache
    assert ext.seen == 120


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    images, ext = _images(), CountingExtractor()
    cached_features(ext, images, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(b"garbage")
    out = cached_features(ext, images, cache_dir=tmp_path)
    assert ext.seen == 80 and out["pool"].shape == (40, 6)


def test_reference_npz_images_labels_and_stats(tmp_path):
    nhwc = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(30) % 3
    mu, sigma = np.ones(6), np.eye(6)
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=nhwc, arr_1=labels, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2))
    images, y, stats = read_reference_npz(path)
    assert images.shape == (30, 3, 8, 8) and torch.equal(images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    assert torch.equal(y, torch.from_numpy(labels).long())
    assert set(stats) == {"pool", "spatial"} and stats["spatial"][1].shape == (2, 2)

    ext = CountingExtractor()
    ref = build_reference(ext, npz=path, cache_dir=tmp_path / "cache")
    assert len(ref) == 30 and torch.equal(ref.labels, y) and "pool" in ref.stats
    build_reference(ext, npz=path, cache_dir=tmp_path / "cache")
    assert ext.seen == 30  # second build: cache hit keyed by the file digest

    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=mu, sigma=sigma)
    ref = build_reference(ext, npz=stats_only, cache_dir=tmp_path / "cache")
    assert len(ref) == 0 and "pool" in ref.stats


def test_reference_npz_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_reference_npz(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((3, 8, 8, 3), dtype=np.float32))
    with pytest.raises(DataError, match="uint8"):
        read_reference_npz(bad)
    with pytest.raises(ConfigError):
        build_reference(CountingExtractor(), images=_images(), npz=bad)


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for name, n in (("cat", 2), ("dog", 3)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    images, labels, names = read_image_folder(tmp_path)
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1, 1, 1] and names == ["cat", "dog"]
    ref = build_reference(CountingExtractor(), folder=tmp_path, cache_dir=None)
    assert ref.labels.tolist() == [0, 0, 1, 1, 1] and ref.features["pool"].shape == (5, 6)
