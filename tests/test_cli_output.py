"""What a user sees: tiny ``tailgen predict`` / ``tailgen test`` runs (tiny random ADM nets from the bad-input kit)
in processes of their own, their stdout / stderr captured. One bar over samples with the sampler step, governed by
``trainer.enable_progress_bar``; no Lightning adverts or known deprecation noise; metrics printed once;
"wrote N samples" on a line of its own."""

from __future__ import annotations

import numpy as np
import pytest

from cli_processes import run_all, the_one
from test_cli_errors import new_kit

NOISE = ("Tip:", "litlogger", "litmodels", "LeafSpec", "Test metric", "DataLoader 0", "Predicting")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, kit = new_kit(tmp_path_factory, "cli_output")
    base = ["--config", str(kit / "base.yaml"), "--data.init_args.num_samples=6", "--data.init_args.batch_size=4",
            "--model.init_args.check_samples=false"]  # random networks make saturated images
    argvs = {
        "predict_bar": ["predict", *base, "--trainer.enable_progress_bar=true"],
        "predict_quiet": ["predict", *base, "--trainer.enable_progress_bar=false"],
        "test": ["test", *base, "--config", str(kit / "eval.yaml"), "--trainer.enable_progress_bar=true"],
    }
    out = run_all(argvs, root)
    for name, (rc, _, stderr, _) in out.items():
        assert rc == 0, stderr
    out = {name: (stdout, stderr) for name, (_, stdout, stderr, _) in out.items()}
    out["_kit"] = kit
    return out


@pytest.mark.parametrize("name", ["predict_bar", "predict_quiet", "test"])
def test_no_adverts_or_known_noise(runs, name):
    stdout, stderr = runs[name]
    for word in NOISE:
        assert word not in stdout + stderr, (word, stdout, stderr)


def test_one_bar_counts_samples_with_the_step(runs):
    stdout, stderr = runs["predict_bar"]
    frames = stderr.replace("\r", "\n").splitlines()
    bars = [f for f in frames if f.startswith("sampling:")]
    assert bars, stderr
    assert any("4/6" in f and "step 3/3" in f for f in bars), bars  # after the first batch, last step shown
    assert any("6/6" in f for f in bars), bars
    assert not any(f.lstrip().startswith("ddpm") for f in frames), stderr  # no second bar over steps
    assert "sampling:" not in stdout


def test_progress_bar_setting_silences_it(runs):
    stdout, stderr = runs["predict_quiet"]
    assert "sampling" not in stderr and "it/s" not in stderr and "%|" not in stderr, stderr


@pytest.mark.parametrize("name", ["predict_bar", "predict_quiet"])
def test_wrote_line_on_its_own(runs, name):
    stdout, _ = runs[name]
    lines = [line for line in stdout.splitlines() if "wrote" in line]
    assert len(lines) == 1 and lines[0].startswith("wrote 6 samples to "), stdout


def test_error_starts_its_own_line(tmp_path, runs):
    """A run that fails mid-bar (degenerate samples of random nets): the error line is not glued to the bar."""
    kit = runs["_kit"]
    rc, _, stderr, _ = run_all({"fails": ["predict", "--config", str(kit / "base.yaml"),
                                          "--trainer.enable_progress_bar=true"]}, tmp_path)["fails"]
    assert rc == 2, stderr
    assert sum(line.startswith("tailgen: error:") for line in stderr.replace("\r", "\n").splitlines()) == 1, stderr


def test_test_writes_a_class_grid_beside_metrics(runs):
    from PIL import Image

    folder = the_one(runs["_kit"].parent / "test").parent  # the run's own folder: ./version_0 (no logger)
    assert folder.name == "version_0"
    grid = np.asarray(Image.open(folder / "grid.png"))
    assert grid.shape[0] == 6 * (16 + 2) - 2  # 6 balanced samples (label k mod 10): six labelled rows


def test_metrics_printed_once(runs):
    stdout, stderr = runs["test"]
    assert sum(line.split()[:1] == ["fid"] for line in stdout.splitlines()) == 1, stdout
    assert "fid" not in stderr.replace("evaluating", ""), stderr
    assert any(f.startswith("evaluating:") and "6/6" in f for f in stderr.replace("\r", "\n").splitlines()), stderr
