"""MetricSuite: names, dispatch, merge == one-shot, and a real 2-process gloo DDP sync (uneven shards, and one
rank without samples)."""

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tailgen.metrics.features import FeatureExtractor
from tailgen.metrics.reference import build_reference
from tailgen.metrics.suite import METRIC_NAMES, MetricSuite
from tailgen.utils import ConfigError, DataError

NUM_CLASSES = 3


class PixelFeatures(FeatureExtractor):
    """Deterministic stand-in for an extractor: pool = 4x4-pooled pixels (48-d), spatial = 2x2-pooled (12-d),
    logits = fixed linear map of pool (10 classes)."""

    provides = ("pool", "logits", "spatial")

    def __init__(self):
        super().__init__(batch_size=32)
        self.register_buffer("w", torch.randn(48, 10, generator=torch.Generator().manual_seed(0)) / 20)

    def _identity(self):
        return "pixel-features/v1"

    def _extract(self, x):
        x = x.float() / 255
        pool = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        spatial = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        # logits in float64: a float32 GEMM's rounding can depend on the batch split (seen with this CPU's BLAS), and
        # the tests compare splits to rel 1e-9
        return {"pool": pool, "logits": (pool.double() @ self.w.double()).float(), "spatial": spatial}


def _data(n, seed):
    """Images whose brightness depends on the label, so the class structure is visible in the features."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    base = (labels.float() * 60 + 40)[:, None, None, None]
    images = (base + 30 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 255).to(torch.uint8)
    return images, labels


ALL = ["fid", "sfid", "is", "precision", "recall", "density", "coverage", "kid", "classwise", "tail", "rarity",
       "tail_coverage"]


def _suite(names=ALL, **kwargs):
    ext = PixelFeatures()
    real, real_y = _data(150, seed=0)
    ref = build_reference(ext, images=real, labels=real_y, cache_dir=None)
    kwargs.setdefault("num_classes", NUM_CLASSES)
    return MetricSuite(names, ext, ref, kid_subsets=5, kid_subset_size=50, is_splits=2, **kwargs)


def test_output_names():
    suite = _suite()
    images, labels = _data(120, seed=1)
    suite.update(images, labels)
    out = suite.compute()
    for name in ("fid", "sfid", "is", "precision", "recall", "density", "coverage", "kid", "kid_std",
                 "classwise/recall_mean", "classwise/fid_mean", "class/2/recall", "class/0/fid",
                 "tail/accuracy", "tail/confidence", "tail/low_conf_share", "class/1/accuracy",
                 "rarity", "rarity_outside", "tail_coverage", "head_coverage", "class/0/rarity",
                 "class/2/tail_coverage", "classwise/rarity_mean", "classwise/head_coverage_mean"):
        assert name in out and isinstance(out[name], float), name
    assert all(math.isfinite(v) for v in out.values())
    assert set(METRIC_NAMES) == set(ALL)
    only = _suite(["fid", "recall"])
    only.update(images, labels)
    assert set(only.compute()) == {"fid", "recall"}
    rarity_only = _suite(["rarity"])
    rarity_only.update(images, labels)
    assert set(rarity_only.compute()) == {"rarity", "rarity_outside"}


def test_tail_metrics_pooled_and_per_class_match_the_functions():
    from tailgen.metrics.tail_manifold import tail_manifold

    ext = PixelFeatures()
    real, real_y = _data(150, seed=0)
    fake, fake_y = _data(120, seed=1)
    suite = _suite(["rarity", "tail_coverage", "classwise"], tail_fraction=0.3)
    suite.update(fake, fake_y)
    out = suite.compute()
    rf, ff = ext(real)["pool"], ext(fake)["pool"]
    assert {k: out[k] for k in ("rarity", "tail_coverage", "head_coverage")} == pytest.approx(
        {k: v for k, v in tail_manifold(rf, ff, 3, 5, 0.3).items() if k != "rarity_outside"})
    for c in range(NUM_CLASSES):
        want = tail_manifold(rf[real_y == c], ff[fake_y == c], 3, 5, 0.3)
        for key in ("rarity", "rarity_outside", "tail_coverage", "head_coverage"):
            assert out[f"class/{c}/{key}"] == pytest.approx(want[key]), (c, key)
    assert out["classwise/tail_coverage_mean"] == pytest.approx(
        sum(out[f"class/{c}/tail_coverage"] for c in range(NUM_CLASSES)) / NUM_CLASSES)


def test_multi_space_suite_prefixes_and_matches_single_suites():
    from tailgen.metrics.suite import MultiSpaceSuite

    class Dimmer(PixelFeatures):  # a second, different feature space
        def _identity(self):
            return "pixel-features-dim/v1"

        def _extract(self, x):
            out = super()._extract(x)
            return {k: v.square() for k, v in out.items()}

    names = ["fid", "recall", "rarity", "classwise", "tail"]
    real, real_y = _data(150, seed=0)
    fake, fake_y = _data(120, seed=1)

    def single(ext):
        return MetricSuite(names, ext, build_reference(ext, images=real, labels=real_y, cache_dir=None),
                           num_classes=NUM_CLASSES)

    multi = MultiSpaceSuite({"": single(PixelFeatures()), "judge": single(Dimmer())})
    multi.update(fake[:50], fake_y[:50])
    multi.update(fake[50:], fake_y[50:])
    out = multi.compute()
    expected = {}
    for prefix, ext in (("", PixelFeatures()), ("judge/", Dimmer())):
        s = single(ext)
        s.update(fake, fake_y)
        expected.update({prefix + k: v for k, v in s.compute().items()})
    assert set(out) == set(expected) and "judge/class/1/recall" in out and "fid" in out
    assert out == pytest.approx(expected, rel=1e-9, nan_ok=True)
    assert out["judge/fid"] != pytest.approx(out["fid"])
    multi.reset()
    with pytest.raises(ConfigError, match="names"):
        MultiSpaceSuite({"a/b": single(PixelFeatures())})


def test_two_batches_equal_one_and_merge():
    images, labels = _data(120, seed=1)
    one = _suite()
    one.update(images, labels)
    expected = one.compute()
    two = _suite()
    two.update(images[:50], labels[:50])
    two.update(images[50:], labels[50:])
    assert two.compute() == pytest.approx(expected, rel=1e-9)
    a, b = _suite(), _suite()
    b.update(images[:71], labels[:71])  # merge_state puts the incoming (b) first: same order as one-shot
    a.update(images[71:], labels[71:])
    for name, metric in a.metrics.items():
        metric.merge_state(b.metrics[name])
    assert a.compute() == pytest.approx(expected, rel=1e-9)
    one.reset()
    one.update(images, labels)  # the reference survives reset
    assert one.compute() == pytest.approx(expected, rel=1e-9)


def test_update_real_instead_of_reference():
    real, real_y = _data(150, seed=0)
    fake, fake_y = _data(120, seed=1)
    fixed = _suite(["fid", "precision", "classwise"])
    fixed.update(fake, fake_y)
    fed = MetricSuite(["fid", "precision", "classwise"], PixelFeatures(), None, num_classes=NUM_CLASSES,
                      feature_dims={"pool": 48})
    fed.update_real(real, real_y)
    fed.update(fake, fake_y)
    assert fed.compute() == pytest.approx(fixed.compute(), rel=1e-9)


def test_config_errors():
    ext = PixelFeatures()
    with pytest.raises(ConfigError, match="unknown"):
        MetricSuite(["fid", "bogus"], ext)
    with pytest.raises(ConfigError, match="num_classes"):
        MetricSuite(["tail"], ext)
    with pytest.raises(ConfigError, match="dimension"):
        MetricSuite(["fid"], ext)
    ext.provides = ("pool",)
    with pytest.raises(ConfigError, match="spatial"):
        MetricSuite(["sfid"], ext, feature_dims={"spatial": 12})
    suite = _suite(["tail"])
    with pytest.raises(DataError, match="labels"):
        suite.update(_data(4, 0)[0])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, labels = _data(120, seed=1)
        cut = 37  # uneven shards: 37 and 83 samples, two batches on rank 1
        suite = _suite()
        if rank == 0:
            suite.update(images[:cut], labels[:cut])
        else:
            suite.update(images[cut:80], labels[cut:80])
            suite.update(images[80:], labels[80:])
        out = suite.compute()  # collective: all ranks
        empty_rank = _suite()  # rank 1 gets no samples at all (fewer samples than ranks)
        if rank == 0:
            empty_rank.update(images, labels)
        out_empty = empty_rank.compute()
        with open(f"{out_path}.{rank}", "w") as f:  # every rank must hold the same synced values
            json.dump({"uneven": out, "empty_rank": out_empty}, f)
    finally:
        dist.destroy_process_group()


def test_ddp_sync_two_processes_uneven(tmp_path):
    out_path = tmp_path / "ddp.json"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(out_path)), nprocs=2, start_method="spawn")
    results = {f"{rank}/{k}": v for rank in (0, 1)
               for k, v in json.loads(out_path.with_name(f"{out_path.name}.{rank}").read_text()).items()}
    single = _suite()
    images, labels = _data(120, seed=1)
    single.update(images, labels)
    expected = single.compute()
    for got in results.values():
        assert set(got) == set(expected)
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_precomputed_npz_statistics(tmp_path):
    import numpy as np

    from tailgen.metrics.fid import frechet_distance, gaussian_stats

    ext = PixelFeatures()
    real, real_y = _data(150, seed=0)
    fake, fake_y = _data(120, seed=1)
    mu, sigma = gaussian_stats(ext(_data(90, seed=5)[0])["pool"])  # "TF" statistics of another image set
    mu_s, sigma_s = gaussian_stats(ext(_data(90, seed=5)[0])["spatial"])
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=real.permute(0, 2, 3, 1).numpy(), arr_1=real_y.numpy(), mu=mu, sigma=sigma, mu_s=mu_s,
             sigma_s=sigma_s)
    fake_pool = ext(fake)["pool"]
    for use_stats in (True, False):
        suite = MetricSuite.with_reference(["fid", "sfid", "recall"], ext, npz=path, cache_dir=tmp_path / "c",
                                           use_npz_stats=use_stats)
        suite.update(fake, fake_y)
        out = suite.compute()
        ref_stats = (mu, sigma) if use_stats else gaussian_stats(ext(real)["pool"])
        assert out["fid"] == pytest.approx(frechet_distance(*ref_stats, *gaussian_stats(fake_pool)), rel=1e-6)
