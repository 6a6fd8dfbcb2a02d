"""Rarity score and tail / head coverage: constructed sets with known answers, a brute-force reference, the
torchmetrics class, and the prototypes-vs-random check on real Fashion-MNIST features."""

import math

import numpy as np
import pytest
import torch

from tailgen.metrics.manifold import prdc
from tailgen.metrics.tail_manifold import TailManifold, rarity_scores, tail_manifold, tail_masks
from tailgen.utils import ConfigError, DataError


def _col(values):
    return torch.tensor(values, dtype=torch.float64)[:, None]


def test_rarity_known_answer_1d():
    # k = 1 radii: 0, 1, 2 -> 1; 10, 13 -> 3
    real = _col([0.0, 1.0, 2.0, 10.0, 13.0])
    fake = _col([0.5, 11.5, 5.0, 7.5])
    # 0.5: balls of 0 and 1 (radius 1) -> 1; 11.5: balls of 10 and 13 (radius 3) -> 3; 5: in no ball; 7.5: ball of 10
    rs = rarity_scores(real, fake, k=1)
    assert torch.isnan(rs[2])
    assert rs[[0, 1, 3]].tolist() == [1.0, 3.0, 3.0]
    out = tail_manifold(real, fake, k_rarity=1, k_tail=1)
    assert out["rarity"] == pytest.approx(7.0 / 3.0)
    assert out["rarity_outside"] == 0.25


def test_rarity_smallest_containing_ball_wins():
    # a sample inside a small and a large ball gets the small radius; on the boundary counts only when inclusive
    real = _col([0.0, 1.0, 4.0, 8.0])  # k = 1 radii: 1, 1, 3, 4
    fake = _col([2.5])  # d = 1.5 to 1 (radius 1: outside), d = 1.5 to 4 (radius 3: inside)
    assert rarity_scores(real, fake, k=1).item() == 3.0
    edge = _col([5.0])  # d = 1 to 4 (radius 3), d = 3 to 8 (radius 4): 3
    assert rarity_scores(real, edge, k=1).item() == 3.0
    boundary = _col([-1.0])  # d = 1 to 0, radius 1
    assert rarity_scores(real, boundary, k=1).item() == 1.0
    assert torch.isnan(rarity_scores(real, boundary, k=1, inclusive=False)).item()


def _brute(real, fake, k_rarity, k_tail, frac):
    d_rr = torch.cdist(real, real)
    d_rf = torch.cdist(real, fake)
    r_rs = d_rr.sort(1).values[:, k_rarity]
    r_tail = d_rr.sort(1).values[:, k_tail]
    inside = d_rf <= r_rs[:, None]
    rs = torch.where(inside, r_rs[:, None].expand_as(d_rf), torch.full_like(d_rf, math.inf)).amin(0)
    n_tail = math.ceil(frac * real.shape[0])
    tail = torch.zeros(real.shape[0], dtype=torch.bool)
    tail[torch.argsort(r_tail, descending=True, stable=True)[:n_tail]] = True
    cap = r_tail[tail].min()
    covered = (d_rf <= torch.minimum(r_tail, cap)[:, None]).any(1)
    finite = torch.isfinite(rs)
    return {"rarity": rs[finite].mean().item(), "rarity_outside": (~finite).double().mean().item(),
            "tail_coverage": covered[tail].double().mean().item(),
            "head_coverage": covered[~tail].double().mean().item()}


@pytest.mark.parametrize("block_size", [7, 4096])
def test_matches_brute_force(block_size):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(83, 5, generator=g, dtype=torch.float64)
    fake = 1.3 * torch.randn(61, 5, generator=g, dtype=torch.float64) + 0.3
    got = tail_manifold(real, fake, 3, 5, 0.2, block_size=block_size)
    want = _brute(real, fake, 3, 5, 0.2)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert all(0.0 < got[k] < 1.0 for k in ("rarity_outside", "tail_coverage", "head_coverage"))
    # rarity_outside is 1 - precision at the same k
    assert got["rarity_outside"] == pytest.approx(1.0 - prdc(real, fake, k_pr=3)["precision"])


def test_tail_coverage_known_answer_and_the_trap():
    # 8 dense reals (spacing 1), 10 (k = 1 radius 3) and 30 (radius 20): tail = {10, 30}; cap R = 3
    real = _col([0, 1, 2, 3, 4, 5, 6, 7, 10, 30])
    masks = tail_masks(real, _col([3.5]), k_rarity=1, k_tail=1, tail_fraction=0.2)
    assert masks["is_tail"].tolist() == [False] * 8 + [True, True]
    assert masks["radius"] == 3.0 and masks["real_radius"].tolist() == [1.0] * 8 + [3.0, 20.0]
    proto = tail_manifold(real, _col([3.5]), 1, 1, 0.2)  # covers 3 and 4 only
    assert (proto["head_coverage"], proto["tail_coverage"]) == (0.25, 0.0)
    near_tail = tail_manifold(real, _col([30.5]), 1, 1, 0.2)
    assert (near_tail["head_coverage"], near_tail["tail_coverage"]) == (0.0, 0.5)
    # the trap: coverage's own rule counts 30 as covered by a sample 15 away (its ball has radius 20) ...
    far = _col([15.0, 100.0])
    assert prdc(real, far, k_pr=1, k_dc=1)["coverage"] == pytest.approx(0.1)
    # ... the capped radius does not
    assert tail_manifold(real, far, 1, 1, 0.2)["tail_coverage"] == 0.0


def test_metric_class_matches_function_and_resets():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(50, 4, generator=g), torch.randn(40, 4, generator=g)
    m = TailManifold(k_rarity=3, k_tail=5)
    m.set_reference_features(real)
    for part in fake.split(13):
        m.update(part)
    got = m.compute()
    want = tail_manifold(real, fake)
    assert got == pytest.approx(want)
    m.reset()
    m.update(fake, real=True)  # gathered real features override the reference
    m.update(real)
    assert m.compute() == pytest.approx(tail_manifold(fake, real))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="tail_fraction"):
        TailManifold(tail_fraction=1.5)
    with pytest.raises(DataError, match="needs fake features"):
        TailManifold().compute()
    with pytest.raises(DataError, match="differ in dimension"):
        tail_manifold(torch.randn(10, 3), torch.randn(4, 2))


def test_no_sample_in_any_ball_gives_nan_rarity():
    out = tail_manifold(_col([0, 1, 2, 3]), _col([100.0, 200.0]), 1, 1)
    assert math.isnan(out["rarity"]) and out["rarity_outside"] == 1.0


# --------------------------------------------------------------------------------------- real Fashion-MNIST features
FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def _fashion_features(preset, cache_dir):
    """Features of 3,000 random train images (pool for prototypes / the random subset) and of the first 1,000 test
    images (reference), cached under pytest's cache (keyed by images and network, as the reference cache)."""
    from tailgen.data.fashion_mnist import load_fashion_mnist
    from tailgen.metrics.features import ClassifierFeatures
    from tailgen.metrics.reference import cached_features
    from tailgen.models.spec import NetworkSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_x, train_y = load_fashion_mnist("train")
        test_x, _ = load_fashion_mnist("test")
        extractor = ClassifierFeatures(NetworkSpec(preset).build(), timestep=0, batch_size=500, name=preset)
        pool = np.random.default_rng(0).choice(len(train_x), 3000, replace=False)
        pool_f = cached_features(extractor, train_x[pool][:, None], cache_dir=cache_dir)["pool"].double()
        ref_f = cached_features(extractor, test_x[:1000][:, None], cache_dir=cache_dir)["pool"].double()
    finally:
        torch.set_num_threads(threads)
    return pool_f, torch.from_numpy(train_y[pool]).long(), ref_f


def _prototypes(feats, labels, n):
    """The n // 10 images of each class closest to their class's mean feature."""
    keep = []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        d = (feats[idx] - feats[idx].mean(0)).norm(dim=1)
        keep.append(idx[d.argsort()[: n // 10]])
    return feats[torch.cat(keep)]


@pytest.mark.skipif(not __import__("os").path.exists(FASHION), reason="Fashion-MNIST IDX files not installed")
@pytest.mark.parametrize("preset", ["fashion_clean_classifier", "fashion_judge"])
def test_prototypes_score_low_tail_coverage_on_fashion_features(preset, request, tmp_path_factory):
    """Prototypes (the images nearest their class mean) sit in dense regions: they must cover the tail of a real
    reference much less than a random real subset of the same size does, and have lower rarity."""
    from tailgen.models.presets import PRESETS

    if preset not in PRESETS:
        pytest.skip(f"{preset} weights not shipped")
    cache = getattr(request.config, "cache", None)  # pytest's cache (absent with -p no:cacheprovider)
    cache_dir = cache.mkdir("tailgen-features") if cache is not None else tmp_path_factory.mktemp("tailgen-features")
    pool, labels, ref = _fashion_features(preset, cache_dir)
    random_subset = pool[:1000]
    protos = _prototypes(pool, labels, 1000)
    rnd = tail_manifold(ref, random_subset)
    pro = tail_manifold(ref, protos)
    print(f"\n{preset}: random {rnd}\n{preset}: prototypes {pro}")
    # measured (1,000 vs 1,000): clean classifier random 0.725 / prototypes 0.325; judge 0.795 / 0.525
    assert rnd["tail_coverage"] > 0.6 and pro["tail_coverage"] < rnd["tail_coverage"] - 0.2
    assert pro["rarity"] < rnd["rarity"]  # prototypes sit in dense regions: small containing balls
    # the trap the capped balls avoid: with coverage's own balls a random real subset covers the sparse tail
    # *more* often than the dense head, and prototypes cover much more of the tail than with capped balls
    from tailgen.metrics.manifold import manifold_masks

    tail = tail_masks(ref, random_subset)["is_tail"]
    own = {name: manifold_masks(ref, fake)["real_covered"] for name, fake in (("random", random_subset),
                                                                             ("protos", protos))}
    own_tail = {k: v[tail].double().mean().item() for k, v in own.items()}
    print(f"{preset}: coverage's own balls, tail: {own_tail}, head random {own['random'][~tail].double().mean():.3f}")
    assert own_tail["random"] > own["random"][~tail].double().mean().item()
    assert own_tail["protos"] > pro["tail_coverage"] + 0.1
    assert pro["head_coverage"] - pro["tail_coverage"] > rnd["head_coverage"] - rnd["tail_coverage"]
