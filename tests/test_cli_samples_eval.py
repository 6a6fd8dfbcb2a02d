"""Evaluating someone else's samples (issue 13.4): ``tailgen test --data.init_args.samples X.npz`` builds and
loads no diffusion network; samples without labels get the metrics that need none; ADM reference batches'
precomputed statistics are used with Inception features, and statistics of another dimension are one clear error.
Tiny constructed npz files and random tiny networks (the bad-input kit of tests/test_cli_errors.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_processes import found, run_all, the_one
from test_cli_errors import new_kit
from test_metrics_suite import PixelFeatures, _data

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, kit = new_kit(tmp_path_factory, "samples_eval")
    with np.load(kit / "samples.npz") as z:
        np.savez(kit / "unlabelled.npz", arr_0=z["arr_0"])
    # an ADM-style reference batch holding only 2048-d statistics (as Inception's), no images
    np.savez(kit / "stats_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    test = ["test", "--config", str(kit / "base.yaml"), "--config", str(kit / "eval.yaml")]
    argvs = {
        # the network's weights file does not exist: evaluating samples must not load it
        "labelled": [*test, f"--data.init_args.samples={kit / 'samples.npz'}",
                     "--model.init_args.network.checkpoint=/nonexistent/unet.pt",
                     "--model.init_args.evaluation.metrics=[fid,classwise]"],
        "unlabelled": [*test, f"--data.init_args.samples={kit / 'unlabelled.npz'}",
                       "--model.init_args.evaluation.metrics=[fid,classwise,tail]"],
        "only_labelled_metrics": [*test, f"--data.init_args.samples={kit / 'unlabelled.npz'}",
                                  "--model.init_args.evaluation.metrics=[classwise]"],
        "stats_dims_differ": [*test, f"--data.init_args.samples={kit / 'samples.npz'}",
                              f"--model.init_args.evaluation.reference={kit / 'stats_only.npz'}"],
    }
    return run_all(argvs, root)


def _metrics(folder: Path) -> dict:
    return json.loads(the_one(folder).read_text())


def test_samples_need_no_diffusion_network(runs):
    rc, stdout, stderr, folder = runs["labelled"]
    assert rc == 0, stderr
    values = _metrics(folder)
    assert values["fid"] is not None and values["fid"] > 0
    assert "classwise/num_classes" in values
    assert (the_one(folder).parent / "grid.png").is_file()


def test_unlabelled_samples_get_the_metrics_that_need_no_labels(runs):
    rc, stdout, stderr, folder = runs["unlabelled"]
    assert rc == 0, stderr
    values = _metrics(folder)
    assert values["fid"] > 0
    assert not any(k.startswith(("classwise", "tail")) for k in values), values
    assert "no labels" in stdout + stderr and "classwise, tail" in stdout + stderr


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("tailgen: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_only_labelled_metrics_on_unlabelled_samples_is_an_error(runs):
    rc, _, stderr, folder = runs["only_labelled_metrics"]
    assert rc == 2 and "Traceback" not in stderr, stderr
    assert "no labels" in _error_line(stderr) and not found(folder)


def test_statistics_of_another_dimension_are_one_clear_error(runs):
    rc, _, stderr, folder = runs["stats_dims_differ"]
    assert rc == 2 and "Traceback" not in stderr, stderr
    line = _error_line(stderr)
    assert "2048-d" in line and "evaluation.features=inception" in line, line
    assert not found(folder)


def test_predict_without_network_is_a_clear_error(tmp_path):
    from tailgen.module.guided import GuidedDiffusion
    from tailgen.utils import ConfigError

    model = GuidedDiffusion()
    with pytest.raises(ConfigError, match="model.init_args.network is not set"):
        model.generate([0, 1])


def test_inception_features_use_the_batch_statistics(tmp_path, monkeypatch):
    """With features=inception the reference batch's mu/sigma (ADM's) give FID's reference side, not features
    of its images (the extractor is stood in for by PixelFeatures: no Inception weights offline)."""
    import tailgen.metrics.inception as inception
    from tailgen.metrics.fid import frechet_distance, gaussian_stats
    from tailgen.module.evaluation import Evaluation

    monkeypatch.setattr(inception, "InceptionFeatures", lambda *a, **k: PixelFeatures())
    ext = PixelFeatures()
    real, real_y = _data(60, seed=0)
    fake, _ = _data(40, seed=1)
    mu, sigma = gaussian_stats(ext(_data(50, seed=5)[0] // 2)["pool"])  # statistics of another (darker) image set
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=real.permute(0, 2, 3, 1).numpy(), arr_1=real_y.numpy(), mu=mu, sigma=sigma)
    want = frechet_distance(mu, sigma, *gaussian_stats(ext(fake)["pool"]))
    evaluation = Evaluation(metrics=["fid"], features="inception", reference=str(path), cache_dir=str(tmp_path / "c"))
    values = evaluation.evaluate(fake.permute(0, 2, 3, 1))
    assert values["fid"] == pytest.approx(want, rel=1e-6)
    from_images = frechet_distance(*gaussian_stats(ext(real)["pool"]), *gaussian_stats(ext(fake)["pool"]))
    assert abs(values["fid"] - from_images) > 0.1 * abs(from_images)  # the test can tell the two apart
