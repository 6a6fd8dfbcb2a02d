"""CalibratedTargetGuidance: the confidence table against a constructed classifier with a closed-form quantile,
per-class quantiles, the disk cache, the sane shape of the table of the shipped toy classifier, and that the
guidance is variant (e) with c* read from the table."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import nn

from guidance_stubs import make_ctx
from tailgen.diffusion import DiffusionProcess, NoisyClassifier
from tailgen.guidance import CalibratedTargetGuidance, LowDensityGuidance
from tailgen.guidance import calibrated_target as ct
from tailgen.models.spec import NetworkSpec
from tailgen.utils import ConfigError

SHAPE = (1, 4, 4)  # D = 16


class MeanClassifier(nn.Module):
    """Two classes, logits (k m, -k m) with m = mean(x_t): p(y=0 | x) = sigmoid(2 k m), whatever t."""

    def __init__(self, k: float = 2.0):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))

    def forward(self, x, timesteps):
        m = x.flatten(1).mean(1)
        return torch.stack([self.k * m, -self.k * m], 1)


def process(steps="10"):
    return DiffusionProcess.from_flags(noise_schedule="cosine", timestep_respacing=steps)


def constant_images(n, amplitudes):
    """Half class 0 (all pixels +a0), half class 1 (all pixels -a1)."""
    labels = torch.arange(n) % 2
    a = torch.tensor(amplitudes)[labels] * torch.where(labels == 0, 1.0, -1.0)
    return a[:, None, None, None].expand(n, *SHAPE).clone(), labels


def closed_form_quantile(q, t_grid, a, k=2.0, base=None):
    """Q_q of sigmoid(2 k m), m ~ N(sqrt(abar) a, (1 - abar) / D), for the true class of an image of amplitude a."""
    abar = np.cumprod(1 - (base if base is not None else process().base_betas))[t_grid]
    m = np.sqrt(abar) * a + np.sqrt((1 - abar) / math.prod(SHAPE)) * NormalDist().inv_cdf(q)
    return 1 / (1 + np.exp(-2 * k * m))


@pytest.mark.parametrize("q", [0.2, 0.5])
def test_constructed_classifier_gives_the_known_quantile(q):
    images, labels = constant_images(4000, [0.5, 0.5])
    table = ct.tabulate_confidence(NoisyClassifier(MeanClassifier(), process()), images, labels, num_times=10,
                                   progress=False)
    assert table.timesteps[0] == 0 and table.timesteps[-1] == 999 and len(table.timesteps) == 10
    want = closed_form_quantile(q, table.timesteps, 0.5)
    np.testing.assert_allclose(table.quantile(q), want, atol=0.015)
    assert want[0] - want[-1] > 0.3  # the closed form itself varies with t, so the check is not vacuous


def test_per_class_quantiles():
    images, labels = constant_images(4000, [0.6, 0.1])
    table = ct.tabulate_confidence(NoisyClassifier(MeanClassifier(), process()), images, labels, num_times=8,
                                   seed=3, progress=False)
    per_class = table.quantile(0.2, per_class=True)
    assert per_class.shape == (2, 8)
    for c, a in enumerate([0.6, 0.1]):
        np.testing.assert_allclose(per_class[c], closed_form_quantile(0.2, table.timesteps, a), atol=0.015)
    assert (per_class[0, :4] - per_class[1, :4] > 0.1).all()  # the classes really differ at low noise


def test_table_is_cached_on_disk_and_keyed_by_content(tmp_path, monkeypatch):
    images, labels = constant_images(200, [0.5, 0.5])
    clf = NoisyClassifier(MeanClassifier(), process())
    first = ct.cached_confidence_table(clf, images, labels, num_times=5, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(ct, "tabulate_confidence", fail)
    second = ct.cached_confidence_table(clf, images, labels, num_times=5, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(first.p_true, second.p_true)
    np.testing.assert_array_equal(first.timesteps, second.timesteps)
    monkeypatch.undo()
    other = NoisyClassifier(MeanClassifier(k=3.0), process())  # other weights -> another key
    ct.cached_confidence_table(other, images, labels, num_times=5, cache_dir=tmp_path, progress=False)
    ct.cached_confidence_table(clf, images, labels, num_times=5, seed=1, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npz"))) == 3


@pytest.fixture(scope="module")
def toy_classifier():
    spec = NetworkSpec(preset="toy_classifier")
    net = spec.build()
    p = DiffusionProcess.from_flags(**{**spec.diffusion_flags, "timestep_respacing": "50"})
    return NoisyClassifier(net, p)


def test_toy_classifier_table_is_monotone_sane(toy_classifier):
    x, y = ct.calibration_images("toy", 1500, 0, torch.zeros(1, 2))
    table = ct.tabulate_confidence(toy_classifier, x, y, num_times=20, progress=False)
    low, median, mean = table.quantile(0.2), table.quantile(0.5), table.p_true.mean(1)
    for curve in (low, median, mean):
        assert curve[-1] == pytest.approx(1 / 3, abs=0.05)  # pure noise: the classifier knows nothing
        assert curve[0] > 0.99  # clean data: the classifier is confident
    for curve in (median, mean):
        assert (np.diff(curve) < 0.01).all()  # typical confidence falls with t
    # a low quantile is not monotone: at mid noise the least typical real points (the toy's ambiguous rare
    # mode) are less confident than chance and recover toward 1/3 at pure noise
    assert low.min() < 0.3 and (low <= median + 1e-6).all()


def test_guidance_is_variant_e_with_the_table_target(toy_classifier, tmp_path):
    g = CalibratedTargetGuidance(target_quantile=0.3, calibration_data="toy", num_images=600, num_times=12,
                                 cache_dir=str(tmp_path), scale=2.0)
    labels = torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    ctx = make_ctx(x, i=30, process=toy_classifier.process, labels=labels, noisy_classifier=toy_classifier)
    c = g.target_at(ctx)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    images, y = ct.calibration_images("toy", 600, 0, x)
    table = ct.cached_confidence_table(toy_classifier, images, y, num_times=12, cache_dir=tmp_path)
    assert c == pytest.approx(float(np.interp(ctx.t, table.timesteps, table.quantile(0.3))))
    fixed = LowDensityGuidance(variant="target", target_confidence=c, scale=2.0)
    ctx2 = make_ctx(x, i=30, process=toy_classifier.process, labels=labels, noisy_classifier=toy_classifier)
    torch.testing.assert_close(g.direction(ctx), fixed.direction(ctx2))
    # per class: one target per sample, by label
    gc = CalibratedTargetGuidance(target_quantile=0.3, per_class=True, calibration_data="toy", num_images=600,
                                  num_times=12, cache_dir=str(tmp_path))
    per_sample = gc.target_at(ctx)
    curves = table.quantile(0.3, per_class=True)
    want = [np.interp(ctx.t, table.timesteps, curves[int(label)]) for label in labels]
    torch.testing.assert_close(per_sample.double(), torch.tensor(want, dtype=torch.float64))
    assert len(list(tmp_path.glob("*.npz"))) == 1  # same table, read from the cache


def test_bad_options():
    with pytest.raises(ConfigError, match="target_quantile"):
        CalibratedTargetGuidance(target_quantile=1.0)
    with pytest.raises(ConfigError, match="calibration_data"):
        CalibratedTargetGuidance(calibration_data="imagenet")
    with pytest.raises(ConfigError, match="target_space"):
        CalibratedTargetGuidance(target_space="logit")
    g = CalibratedTargetGuidance()
    ctx = make_ctx(torch.zeros(2, 1, 28, 28), labels=torch.tensor([0, 1]), noisy_classifier=lambda x, i: x)
    with pytest.raises(ConfigError, match="NoisyClassifier"):
        g.target_at(ctx)
