"""precision / recall / density / coverage: agreement with the `prdc` package, blocking, tie convention."""

import contextlib
import io

import numpy as np
import pytest
import torch

from tailgen.metrics.manifold import PrecisionRecallDensityCoverage, knn_radii, manifold_masks, prdc
from tailgen.utils import DataError

compute_prdc = pytest.importorskip("prdc").compute_prdc
KEYS = ("precision", "recall", "density", "coverage")


def _reference(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints sizes
        return compute_prdc(real, fake, k)


CASES = [  # (N real, M fake, dim, k, fake shift, fake scale)
    (300, 300, 16, 3, 0.0, 1.0),
    (257, 411, 8, 5, 0.3, 1.2),
    (400, 150, 32, 5, 0.5, 0.7),
    (120, 333, 4, 2, 0.0, 2.0),
    (450, 380, 64, 3, 0.2, 1.0),
]


@pytest.mark.parametrize("n,m,d,k,shift,scale", CASES)
def test_agrees_with_prdc_package(n, m, d, k, shift, scale):
    rng = np.random.default_rng(n * 7 + m)
    real = rng.normal(size=(n, d))
    fake = rng.normal(loc=shift, scale=scale, size=(m, d))
    ref = _reference(real, fake, k)
    for inclusive in (False, True):  # continuous data: no ties, so both conventions agree with prdc
        for block in (4096, 64, 37):
            out = prdc(torch.from_numpy(real), torch.from_numpy(fake), k, k, inclusive=inclusive, block_size=block)
            for key in KEYS:
                assert abs(out[key] - ref[key]) <= 1e-6, (key, inclusive, block, out[key], ref[key])
    # float32 input (the production dtype) gives the same decisions on these sets
    out32 = prdc(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), k, k, block_size=50)
    assert max(abs(out32[key] - ref[key]) for key in KEYS) <= 1e-6


def test_blocked_equals_unblocked_masks():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(151, 12, generator=g), torch.randn(97, 12, generator=g) * 1.3
    full = manifold_masks(real, fake, 3, 5, block_size=10_000)
    for block in (6, 64):  # 6: k+1 = 6 smallest must survive partial first tiles
        blocked = manifold_masks(real, fake, 3, 5, block_size=block)
        for key in full:
            assert torch.equal(full[key], blocked[key]), (key, block)


def test_knn_radii_matches_brute_force():
    x = torch.randn(150, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d = torch.cdist(x, x) ** 2
    expected = d.sort(dim=1).values  # column 0 is self
    got = knn_radii(x, [1, 3, 5], block_size=16)
    for row, k in enumerate([1, 3, 5]):
        torch.testing.assert_close(got[row], expected[:, k], rtol=1e-9, atol=1e-9)


def test_k_pr_and_k_dc_are_independent():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(200, 8)), rng.normal(0.4, 1.0, size=(250, 8))
    out = prdc(torch.from_numpy(real), torch.from_numpy(fake), k_pr=3, k_dc=5, inclusive=False)
    r3, r5 = _reference(real, fake, 3), _reference(real, fake, 5)
    assert out["precision"] == pytest.approx(r3["precision"], abs=1e-12)
    assert out["recall"] == pytest.approx(r3["recall"], abs=1e-12)
    assert out["density"] == pytest.approx(r5["density"], abs=1e-12)
    assert out["coverage"] == pytest.approx(r5["coverage"], abs=1e-12)


def test_tie_convention_on_duplicates():
    """Exact duplicates create ties d == radius: `<=` (ADM, default) counts them, `<` (prdc) does not."""
    base = np.random.default_rng(4).normal(size=(40, 5))
    real = np.repeat(base, 4, axis=0)  # each point has 3 exact duplicates -> NND_3 = 0
    fake = real.copy()
    strict = prdc(torch.from_numpy(real), torch.from_numpy(fake), 3, 3, inclusive=False)
    ref = _reference(real, fake, 3)
    for key in KEYS:
        assert strict[key] == pytest.approx(ref[key], abs=1e-6)
    assert strict["precision"] == 0.0  # radius-0 balls hold nothing under `<`
    inclusive = prdc(torch.from_numpy(real), torch.from_numpy(fake), 3, 3)
    assert inclusive["precision"] == 1.0 and inclusive["recall"] == 1.0 and inclusive["coverage"] == 1.0


def test_collapsed_fake_set():
    g = torch.Generator().manual_seed(5)
    real = torch.randn(300, 8, generator=g)
    fake = real[:1].repeat(300, 1) + 1e-3 * torch.randn(300, 8, generator=g)
    out = prdc(real, fake)
    assert out["precision"] == 1.0 and out["recall"] < 0.05 and out["coverage"] < 0.05


def test_errors():
    with pytest.raises(DataError):
        prdc(torch.randn(3, 4), torch.randn(10, 4))  # fewer than k+1 real points
    with pytest.raises(DataError):
        prdc(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(DataError):
        prdc(torch.full((10, 4), float("nan")), torch.randn(10, 4))


def test_metric_merge_equals_one_shot():
    g = torch.Generator().manual_seed(6)
    real, fake = torch.randn(200, 8, generator=g), torch.randn(230, 8, generator=g)
    one = PrecisionRecallDensityCoverage()
    one.set_reference_features(real)
    one.update(fake[:100])
    one.update(fake[100:])
    a, b = PrecisionRecallDensityCoverage(), PrecisionRecallDensityCoverage()
    a.set_reference_features(real)
    a.update(fake[:77])
    b.update(fake[77:])
    a.merge_state(b)  # what DDP's gather does with the cat states (order does not matter here)
    assert a.compute() == one.compute() == prdc(real, fake)
    # real features fed as state instead of a fixed reference
    c = PrecisionRecallDensityCoverage()
    c.update(real, real=True)
    c.update(fake)
    assert c.compute() == one.compute()
