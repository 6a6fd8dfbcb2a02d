"""Sehwag et al. hardness guidance (methods.md §3.1): the Gaussian NLL against torch.distributions, the fitted
moments, the direction against its closed form for linear features and a linear denoiser, the fit's caches."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from guidance_stubs import SHAPE, LinearDenoiser, batch, make_ctx
from tailgen.guidance import GuidanceStack, SehwagHardnessGuidance
from tailgen.guidance import hardness as hardness_module
from tailgen.guidance.hardness import ClassGaussians, fit_class_gaussians
from tailgen.models.spec import NetworkSpec
from tailgen.utils import ConfigError

LABELS = torch.tensor([0, 1, 2, 1])
K = 3  # feature dim


class LinearFeatures(nn.Module):
    """A 'classifier' with penultimate features f = A x.flatten() + b; counts the images it sees."""

    def __init__(self, dim: int = math.prod(SHAPE), k: int = K, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(dim, k)
        self.seen = 0

    def forward_with_features(self, x, t):
        self.seen += x.shape[0]
        f = self.lin(x.flatten(1))
        return f.sum(1, keepdim=True), f


def random_gaussians(num_classes=3, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(num_classes, k, k, generator=g, dtype=torch.float64)
    return ClassGaussians(torch.randn(num_classes, k, generator=g, dtype=torch.float64),
                          a @ a.transpose(1, 2) + 0.5 * torch.eye(k, dtype=torch.float64))


def test_nll_is_the_gaussian_negative_log_likelihood():
    gauss, f = random_gaussians(), torch.randn(4, K, dtype=torch.float64)
    want = torch.stack([-torch.distributions.MultivariateNormal(gauss.means[y], gauss.covs[y]).log_prob(f[b])
                        for b, y in enumerate(LABELS.tolist())])
    torch.testing.assert_close(gauss.nll(f, LABELS), want)
    torch.testing.assert_close(gauss.nll(f.float(), LABELS).double(), want, rtol=1e-5, atol=1e-5)


def test_fit_gives_the_sample_moments_and_shrinks_toward_the_identity():
    rng = np.random.default_rng(0)
    f, y = rng.normal(size=(300, K)) @ rng.normal(size=(K, K)), rng.integers(0, 3, 300)
    for lam in (0.0, 0.1):
        gauss = ClassGaussians.fit(torch.from_numpy(f), torch.from_numpy(y), 3, shrinkage=lam)
        for c in range(3):
            cov = np.cov(f[y == c].T)
            np.testing.assert_allclose(gauss.means[c].numpy(), f[y == c].mean(0), rtol=1e-12)
            np.testing.assert_allclose(gauss.covs[c].numpy(), cov + lam * np.trace(cov) / K * np.eye(K), rtol=1e-10)


def test_direction_closed_form_linear_features_and_denoiser():
    """x0_hat = c x - d shift_y, f = A x0 + b  =>  grad_x H = c A^T Sigma_y^{-1} (f - mu_y)."""
    den, net, gauss, x = LinearDenoiser(a=0.3), LinearFeatures(), random_gaussians(), batch()
    ctx = make_ctx(x, i=4, labels=LABELS, denoiser=den)
    abar = float(ctx.process.alphas_cumprod[4])
    c = (1 - math.sqrt(1 - abar) * 0.3) / math.sqrt(abar)
    x0 = c * x.double() - math.sqrt(1 - abar) / math.sqrt(abar) * den.shift[LABELS].double()
    A, b = net.lin.weight.detach().double(), net.lin.bias.detach().double()
    r = x0.flatten(1) @ A.T + b - gauss.means[LABELS]
    want = c * (torch.linalg.solve(gauss.covs[LABELS], r[..., None]).squeeze(-1) @ A).reshape(x.shape)
    g = SehwagHardnessGuidance(NetworkSpec(preset="fashion_clean_classifier")).bind(net, gauss)
    torch.testing.assert_close(g.direction(ctx).double(), want, rtol=1e-4, atol=1e-6)
    # through the stack: DDPM mean form, alpha * d; normalised: peak 1 per sample
    g.scale = 0.5
    torch.testing.assert_close(GuidanceStack([g]).mean_gradient(ctx).double(), 0.5 * want, rtol=1e-4, atol=1e-6)
    g.normalize = True
    peak = want.flatten(1).abs().amax(1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(g.direction(ctx).double(), want / peak, rtol=1e-4, atol=1e-6)


@pytest.fixture()
def training_npz(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(60, 2, 2, 3), dtype=np.uint8)  # NHWC -> 3 x 2 x 2 images
    labels = np.arange(60) % 3
    path = tmp_path / "train.npz"
    np.savez(path, images, labels)
    return path, images, labels


def test_fit_runs_once_then_comes_from_the_caches(training_npz, tmp_path, monkeypatch):
    path, images, labels = training_npz
    monkeypatch.setattr(hardness_module, "_FITTED", {})
    net, cache = LinearFeatures(), tmp_path / "cache"
    first = fit_class_gaussians(net, images, labels, num_classes=3, batch_size=7, cache_dir=cache, progress=False)
    assert net.seen == 60 and len(list(cache.glob("*.npz"))) == 1
    fit_class_gaussians(net, images, labels, num_classes=3, cache_dir=cache, progress=False)
    assert net.seen == 60  # memory cache
    monkeypatch.setattr(hardness_module, "_FITTED", {})
    again = fit_class_gaussians(net, images, labels, num_classes=3, batch_size=60, cache_dir=cache, progress=False)
    assert net.seen == 60  # disk cache
    torch.testing.assert_close(again.covs, first.covs)
    # direct moments of the features (batch size does not matter)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        feats = net.lin(x.flatten(1)).double()
    torch.testing.assert_close(first.means, ClassGaussians.fit(feats, torch.from_numpy(labels), 3, 1e-2).means)
    # other settings or weights -> a new fit and a new file
    fit_class_gaussians(net, images, labels, num_classes=3, shrinkage=0.5, cache_dir=cache, progress=False)
    assert net.seen == 120
    with torch.no_grad():
        net.lin.bias.add_(1.0)
    fit_class_gaussians(net, images, labels, num_classes=3, cache_dir=cache, progress=False)
    assert net.seen == 180 and len(list(cache.glob("*.npz"))) == 3


def test_prepare_fits_on_an_npz_training_set(training_npz, tmp_path, monkeypatch):
    path, images, labels = training_npz
    monkeypatch.setattr(hardness_module, "_FITTED", {})
    net = LinearFeatures()
    g = SehwagHardnessGuidance(NetworkSpec(preset="fashion_clean_classifier"), data=str(path), cache_dir=None)
    gauss = g.bind(net).prepare("cpu")
    assert gauss.means.shape == (3, K) and net.seen == 60


@pytest.mark.parametrize("kwargs,word", [({"shrinkage": -1.0}, "shrinkage"), ({"data": "cifar"}, "data"),
                                         ({"batch_size": 0}, "batch_size")])
def test_bad_configs(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        SehwagHardnessGuidance(NetworkSpec(preset="fashion_clean_classifier"), **kwargs)
