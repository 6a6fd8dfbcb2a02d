"""FID sanity on real Fashion-MNIST images through `ClassifierFeatures`.

Features: a fixed, randomly initialised small conv classifier with the ADM classifier's call signature
(``forward_features(x, t)`` / ``forward(x, t)``). When a trained clean Fashion-MNIST classifier exists, set
``TAILGEN_FMNIST_CLASSIFIER`` to a module path ``pkg.mod:factory`` returning it; the assertions (real-vs-real small,
monotone in degradation) are meant to hold for any reasonable feature network.
"""

import gzip
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tailgen.metrics.features import ClassifierFeatures
from tailgen.metrics.fid import FrechetDistance, gaussian_stats

ROOT = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (ROOT / "train-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST IDX files not installed")


def _read_idx_images(path, n):
    with gzip.open(path, "rb") as f:
        f.read(16)  # magic, count, rows, cols
        return np.frombuffer(f.read(n * 28 * 28), dtype=np.uint8).reshape(n, 1, 28, 28)


class TinyClassifier(nn.Module):
    """28x28 grey -> 32-d features -> 10 logits; same call signature as EncoderUNetModel."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward_features(self, x, t):
        return self.body(x)

    def forward(self, x, t):
        return self.head(self.body(x))


def _network():
    spec = os.environ.get("TAILGEN_FMNIST_CLASSIFIER")
    if spec:
        module, factory = spec.split(":")
        return getattr(importlib.import_module(module), factory)()
    torch.manual_seed(0)
    return TinyClassifier()


@pytest.fixture(scope="module")
def setup():
    images = torch.from_numpy(_read_idx_images(ROOT / "train-images-idx3-ubyte.gz", 2400).copy())
    extractor = ClassifierFeatures(_network(), timestep=0)
    real = extractor(images[:1200])["pool"]
    return images[:1200], images[1200:], real, extractor


def _fid(extractor, real_feats, images):
    metric = FrechetDistance(real_feats.shape[1])
    metric.set_reference(*gaussian_stats(real_feats))
    metric.update(extractor(images)["pool"])
    return metric.compute().item()


def _noisy(images, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = images.float() + sigma * torch.randn(images.shape, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


def test_fid_real_vs_real_small_and_monotone_in_noise(setup):
    ref_images, other, real_feats, extractor = setup
    assert abs(_fid(extractor, real_feats, ref_images)) < 1e-6
    base = _fid(extractor, real_feats, other)
    values = [base] + [_fid(extractor, real_feats, _noisy(other, s)) for s in (8, 16, 32, 64)]
    print("FID real-vs-real and noise sigma 8/16/32/64:", [f"{v:.3g}" for v in values])
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] > 20 * base


def test_fid_monotone_in_blur(setup):
    _, other, real_feats, extractor = setup
    values = [_fid(extractor, real_feats, other)]
    x = other.float()
    for _ in range(3):  # repeated 3x3 box blur
        x = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        values.append(_fid(extractor, real_feats, x.round().to(torch.uint8)))
    print("FID real-vs-real and 1/2/3 box blurs:", [f"{v:.3g}" for v in values])
    assert all(b > a for a, b in zip(values, values[1:])), values

