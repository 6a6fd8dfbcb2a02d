"""FID / sFID machinery, KID and Inception Score on synthetic features."""

import math

import numpy as np
import pytest
import torch

from tailgen.metrics.fid import (FrechetDistance, KernelDistance, frechet_distance, frechet_distance_features,
                                 gaussian_stats, kernel_distance)
from tailgen.metrics.inception_score import InceptionScore, inception_score
from tailgen.utils import DataError


def _features(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    return (torch.randn(n, d, generator=g) @ mix + shift).double()


def test_fid_of_a_set_with_itself_is_zero():
    x = _features(500, 32, 0)
    mu, s = gaussian_stats(x)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    assert abs(frechet_distance(mu, s, mu, s, method="sqrtm")) < 1e-6
    assert abs(frechet_distance_features(x, x)) < 1e-8


def test_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    # |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 for commuting covariances
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-10)


def test_eigh_and_sqrtm_agree_and_singular_covariance():
    a, b = _features(400, 24, 1), _features(300, 24, 2, shift=0.3)
    args = (*gaussian_stats(a), *gaussian_stats(b))
    assert frechet_distance(*args) == pytest.approx(frechet_distance(*args, method="sqrtm"), rel=1e-7)
    # n < d: singular covariances (ADM adds eps I to sqrtm); eigh needs no offset
    a, b = _features(20, 64, 3), _features(25, 64, 4, shift=0.2)
    args = (*gaussian_stats(a), *gaussian_stats(b))
    eig, sq = frechet_distance(*args), frechet_distance(*args, method="sqrtm")
    assert math.isfinite(eig) and eig == pytest.approx(sq, rel=1e-4)


@pytest.mark.parametrize("n1,n2,d", [(20, 30, 64), (15, 15, 100), (200, 150, 16)])
def test_low_rank_formula_matches_stats(n1, n2, d):
    a, b = _features(n1, d, 5), _features(n2, d, 6, shift=0.5)
    expected = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    # eigh on singular covariances: sqrt of ~1e-15 eigenvalues adds ~1e-6 absolute; the low-rank form is exact
    assert frechet_distance_features(a, b) == pytest.approx(expected, rel=1e-7)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_sums_equal_batch_stats_and_merge():
    real, fake = _features(300, 16, 7), _features(260, 16, 8, shift=0.2)
    expected = frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))
    one = FrechetDistance(16)
    one.set_reference_features(real)
    for part in fake.float().split(64):
        one.update(part)
    assert one.compute().item() == pytest.approx(expected, rel=1e-5)  # float32 features in
    a, b = FrechetDistance(16), FrechetDistance(16)
    a.update(real.float()[:100], real=True)
    b.update(real.float()[100:], real=True)
    a.update(fake.float()[:13])
    b.update(fake.float()[13:])
    a.merge_state(b)  # = DDP sum-reduction of the states
    assert a.compute().item() == pytest.approx(one.compute().item(), rel=1e-9)
    a.reset()
    with pytest.raises(DataError):
        a.compute()
    one.reset()  # the fixed reference survives reset
    one.update(fake.float())
    assert one.compute().item() == pytest.approx(expected, rel=1e-5)


def test_reference_shape_checked():
    m = FrechetDistance(8)
    with pytest.raises(DataError):
        m.set_reference(np.zeros(7), np.eye(7))
    with pytest.raises(DataError):
        m.update(torch.zeros(4, 9))


def test_kid_small_for_same_distribution_and_metric():
    a, b, c = _features(300, 16, 9), _features(300, 16, 10), _features(300, 16, 11, shift=1.0)
    same, _ = kernel_distance(a, b, subsets=20, subset_size=100)
    diff, _ = kernel_distance(a, c, subsets=20, subset_size=100)
    assert abs(same) < 0.05 * diff
    m = KernelDistance(subsets=20, subset_size=100)
    m.set_reference_features(a)
    m.update(c[:150].float())
    m.update(c[150:].float())
    mean, std = m.compute()
    assert mean.item() == pytest.approx(kernel_distance(a.float(), c.float(), subsets=20, subset_size=100)[0])


def test_inception_score_known_values():
    c = 10
    uniform = torch.zeros(100, c)
    assert inception_score(uniform, splits=1)[0] == pytest.approx(1.0)
    confident = torch.full((100, c), -1e4)
    confident[torch.arange(100), torch.arange(100) % c] = 0.0  # one-hot, balanced -> IS = C
    assert inception_score(confident, splits=10)[0] == pytest.approx(c, rel=1e-6)
    collapsed = torch.full((100, c), -1e4)
    collapsed[:, 3] = 0.0  # one-hot, all one class -> IS = 1
    assert inception_score(collapsed)[0] == pytest.approx(1.0)
    # splits as ADM: 50 samples, split_size 25 == splits 2
    logits = torch.randn(50, c, generator=torch.Generator().manual_seed(0)) * 3
    assert inception_score(logits, splits=2) == inception_score(logits, split_size=25)


def test_inception_score_metric_merge():
    logits = torch.randn(90, 7, generator=torch.Generator().manual_seed(1)) * 2
    one = InceptionScore(splits=3)
    one.update(logits)
    a, b = InceptionScore(splits=3), InceptionScore(splits=3)
    b.update(logits[:40])  # merge puts the incoming state first: keeps the order here
    a.update(logits[40:])
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(one.compute().item(), rel=1e-12)
