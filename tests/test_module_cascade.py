"""A cascade's second stage through the CLI: `tailgen predict` with an upsampler preset (the tiny fashion_upsampler,
random weights, 2 steps, sample check off) reads a first stage's samples.npz, writes samples.npz at the upsampler's
resolution with the labels carried over, keys resumes to the input images, and refuses bad low-res input in one
line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tailgen.cli import main
from tailgen.models.spec import NetworkSpec
from tailgen.module.guided import GuidedDiffusion
from tailgen.module.sampling_data import LowResDataset, cascade_seed, sample_seed
from tailgen.utils import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion" / "upsample_14_28.yaml"
LABELS = np.array([3, 0, 9, 9, 4, 1], dtype=np.int64)


def first_stage(path: Path, size: int = 14, n: int = 6, seed: int = 0, labels=True) -> Path:
    """A samples.npz as `tailgen predict` writes it (arr_0 uint8 N×H×W×1, arr_1 labels, seeds, indices)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)
    arrays = {"arr_0": images, "seeds": np.arange(n), "indices": np.arange(n)}
    if labels:
        arrays["arr_1"] = LABELS[:n]
    np.savez(path, **arrays)
    return path


def predict(low_res: Path, out: Path, *extra: str) -> None:
    main(["predict", "--config", str(CONFIG), "--model.init_args.network.init_args.random_init=true",
          "--model.init_args.diffusion.timestep_respacing=2", "--model.init_args.check_samples=false",
          "--model.init_args.progress=false", "--trainer.enable_progress_bar=false",
          f"--data.init_args.low_res={low_res}", "--data.init_args.num_samples=5", "--data.init_args.batch_size=3",
          f"--writer.output_dir={out}", *extra])


def test_predict_upsamples_a_first_stage(tmp_path, capsys):
    low = first_stage(tmp_path / "stage1.npz")
    predict(low, tmp_path / "up")
    out = np.load(tmp_path / "up" / "samples.npz")
    assert out["arr_0"].shape == (5, 28, 28, 1) and out["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(out["arr_1"], LABELS[:5])  # labels carried over, in order
    np.testing.assert_array_equal(out["indices"], np.arange(5))
    np.testing.assert_array_equal(out["seeds"], [cascade_seed(0, k) for k in range(5)])
    assert not set(out["seeds"]) & {sample_seed(0, k) for k in range(5)}  # not the first stage's noise streams
    assert (tmp_path / "up" / "grid.png").stat().st_size > 0
    assert "wrote 5 samples" in capsys.readouterr().out
    # the same command again: nothing to do; other low-res images with the same labels: another config
    predict(low, tmp_path / "up")
    assert "nothing to do" in capsys.readouterr().out
    other = first_stage(tmp_path / "other.npz", seed=1)
    with pytest.raises(SystemExit) as exit_info:
        predict(other, tmp_path / "up")
    assert exit_info.value.code == 2 and "overwrite" in capsys.readouterr().err


def test_the_low_res_image_conditions_each_sample_batch_independently():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = GuidedDiffusion(NetworkSpec("fashion_upsampler", random_init=True), diffusion={"timestep_respacing": "2"},
                             progress=False, check_samples=False)
    with torch.no_grad():  # ADM zero-initialises its output layers: give them weights so the output depends on x
        for p in module.net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (3, 14, 14, 1), dtype=np.uint8)
    labels, seeds = [1, 2, 3], [7, 8, 9]
    a = module.generate(labels, seeds, low_res=low)
    assert a.shape == (3, 28, 28, 1)
    torch.testing.assert_close(module.generate(labels, seeds, low_res=low, batch_size=1), a, atol=1, rtol=0)
    changed = low.copy()
    changed[1] = 255 - changed[1]
    b = module.generate(labels, seeds, low_res=changed)
    assert torch.equal(a[[0, 2]], b[[0, 2]]) and not torch.equal(a[1], b[1])
    with pytest.raises(ConfigError, match="needs the low-resolution images"):
        module.generate(labels, seeds)
    with pytest.raises(ConfigError, match=r"low_res of shape \(N, 1, 14, 14\)"):
        module.generate(labels, seeds, low_res=rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8))


def test_dataset_converts_like_guided_diffusion(tmp_path):
    path = first_stage(tmp_path / "s.npz")
    data = LowResDataset(str(path), 4, base_seed=5, shape=(1, 14, 14), num_classes=10)
    item = data[torch.tensor([2, 0])]
    raw = np.load(path)["arr_0"]
    want = torch.from_numpy(raw[[2, 0]]).permute(0, 3, 1, 2).float() / 127.5 - 1  # super_res_sample.py
    assert torch.equal(item["low_res"], want) and item["label"].tolist() == [9, 3]
    assert item["seed"].tolist() == [cascade_seed(5, 2), cascade_seed(5, 0)]
    assert data[1]["low_res"].shape == (1, 14, 14)


@pytest.mark.parametrize("case, words", [
    ("missing", ["does not exist", "data.low_res"]),
    ("wrong_resolution", ["28x28x1", "upsampler takes 14x14x1"]),
    ("too_few", ["holds 3 images", "num_samples"]),
    ("no_labels", ["no labels", "class-conditional"]),
    ("not_an_upsampler", ["not an upsampler"]),
    ("no_low_res", ["needs the low-resolution images", "data.init_args.low_res"]),
    ("not_npz", ["data.low_res"]),
    ("untrained", ["fashion_upsampler", "no trained weights exist yet", "model.init_args.network.checkpoint"]),
    ("labels_conflict", ["data.labels=3 conflicts with data.low_res", "low-res samples.npz", "default (uniform)"]),
])
def test_bad_low_res_gives_one_line(tmp_path, capsys, monkeypatch, case, words):
    low, extra = first_stage(tmp_path / "stage1.npz"), []
    if case == "missing":
        low = tmp_path / "nowhere" / "samples.npz"
    elif case == "wrong_resolution":
        low = first_stage(tmp_path / "s28.npz", size=28)
    elif case == "too_few":
        low = first_stage(tmp_path / "s3.npz", n=3)
    elif case == "no_labels":
        low = first_stage(tmp_path / "nolabels.npz", labels=False)
    elif case == "not_npz":
        low = tmp_path / "text.npz"
        low.write_text("not an archive")
    elif case == "not_an_upsampler":
        extra = ["--model.init_args.network=null", "--model.init_args.network.preset=fashion_diffusion"]
    elif case == "no_low_res":
        extra = ["--data.init_args.low_res=null"]
    elif case == "labels_conflict":  # the labels come from the low-res file: another setting would be ignored
        extra = ["--data.init_args.labels=3"]
    elif case == "untrained":  # a preset registered before its weights exist (as fashion_upsampler was)
        from tailgen.models import presets

        monkeypatch.setitem(presets.PRESETS, "fashion_upsampler", {
            **presets.PRESETS["fashion_upsampler"], "weights": None,
            "untrained": "no trained weights exist yet: train it with tailgen fit"})
        extra = ["--model.init_args.network.init_args.random_init=false"]
    with pytest.raises(SystemExit) as exit_info:
        predict(low, tmp_path / "out", *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tailgen: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, err)
    assert not (tmp_path / "out" / "samples.npz").exists()
