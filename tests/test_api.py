"""The Python API: `from tailgen import ...` exposes sampling, guidances, evaluation and metrics without pulling
Lightning into the lower layers; `GuidedDiffusion.generate` samples without a Trainer (seeds optional, the same
images as the CLI's seeds); README's example runs as written (with fewer steps and samples)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tailgen
from tailgen import ClassifierGuidance, GuidedDiffusion, NetworkSpec
from tailgen.module.sampling_data import LabelSeedDataset
from tailgen.utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_exported_name_resolves():
    for name in tailgen.__all__:
        assert getattr(tailgen, name) is not None, name
    with pytest.raises(AttributeError):
        tailgen.NoSuchThing  # noqa: B018


def test_lower_layers_do_not_import_lightning():
    code = "import sys, tailgen, tailgen.guidance, tailgen.sampling; assert 'lightning' not in sys.modules, 'lightning'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return GuidedDiffusion(NetworkSpec("fashion_diffusion"), classifier=NetworkSpec("fashion_noisy_classifier"),
                           guidances={"cg": ClassifierGuidance(scale=1.0)}, diffusion={"timestep_respacing": "3"},
                           progress=False)


def test_generate_without_seeds_gives_the_cli_samples(model):
    labels = [3, 0, 7, 7, 1]
    images = model.generate(labels, batch_size=2)
    assert images.shape == (5, 28, 28, 1) and images.dtype == torch.uint8
    # what `tailgen predict` (data seed 0) computes for these labels, in one batch
    data = LabelSeedDataset(labels, 0)
    batch = {k: torch.stack([data[i][k] for i in range(len(labels))]) for k in ("label", "seed", "index")}
    torch.testing.assert_close(images, model.predict_step(batch)["images"], atol=1, rtol=0)
    other = model.generate(labels, seed=1)
    assert not torch.equal(other, images)  # another base seed, other images
    torch.testing.assert_close(model.generate(labels, seeds=batch["seed"]), images, atol=1, rtol=0)


def test_generate_bad_input(model):
    with pytest.raises(ConfigError, match="one seed per sample"):
        model.generate([0, 1], seeds=[5])
    with pytest.raises(ConfigError, match="out of range"):
        model.generate([10])
    with pytest.raises(ConfigError, match="labels"):
        model.generate()


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    code = readme_example()
    # fewer steps, one sample per class, a small reference: each substitution must still find its text
    for old, new in [('"timestep_respacing": "50"', '"timestep_respacing": "3"'), ("range(8)", "range(1)"),
                     ("nrow=8", "nrow=1"), ("Evaluation(", "Evaluation(max_reference=100, cache_dir=None, ")]:
        assert old in code, f"README's Python example no longer contains {old!r}: update this test"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["images"].shape == (10, 28, 28, 1)
    grid = tmp_path / "grid.png"
    assert grid.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "'recall'" in printed and "'fid'" in printed
    from PIL import Image

    assert np.asarray(Image.open(grid)).shape[:2] == (10 * 30 - 2, 28)  # one row per class


@pytest.mark.slow
def test_api_example_script_runs(tmp_path):
    """tools/api_example.py end to end with one sample per class and two steps."""
    subprocess.run([sys.executable, str(ROOT / "tools/api_example.py"), "--per-class", "1", "--steps", "2", "--no-sample-check",
                    "--max-reference", "50", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")],
                   check=True, cwd=tmp_path, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads((tmp_path / "metrics.json").read_text())
    assert set(results) == {"unguided", "tail"} and all(0 <= r["recall"] <= 1 for r in results.values())
    assert (tmp_path / "grid_unguided.png").stat().st_size > 0 and (tmp_path / "grid_tail.png").stat().st_size > 0
