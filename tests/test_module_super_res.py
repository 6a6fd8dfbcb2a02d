"""Training the Fashion cascade: the low_res of super-resolution training is the area-downsampled image on uint8 levels
(checked by hand), it reaches the network through the sampling adapter path, a 2-step ``tailgen fit`` of a tiny first
stage and a tiny upsampler export weights that ``tailgen predict`` samples as a cascade (first stage -> its
samples.npz -> upsampler), the configs' flags are the presets', and bad sizes end in one error line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from cli_processes import REPO, run_forked
from tailgen.cli import main
from tailgen.data.fashion_mnist import to_model_range
from tailgen.data.resize import area_downsample
from tailgen.diffusion.adapters import ADMDenoiser
from tailgen.diffusion.losses import hybrid_loss
from tailgen.models.presets import PRESETS, build_network
from tailgen.module.sampling_data import low_res_inputs
from tailgen.module.super_res import SuperResTrainer
from tailgen.sampling.run import SamplingRun
from tailgen.utils import ConfigError, DataError
from tailgen.utils.images import from_uint8
from test_data_fashion import _tiny_folder

sys.path.insert(0, str(REPO / "tools"))

CONFIGS = REPO / "configs" / "fashion"
TINY_UP = dict(large_size=28, small_size=14, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
               attention_resolutions="", learn_sigma=True, class_cond=True, num_classes=11, resblock_updown=True)
COSINE = dict(diffusion_steps=1000, noise_schedule="cosine", learn_sigma=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def _levels(n: int = 3, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _hand_downsample(images: np.ndarray) -> np.ndarray:
    """2x2 block means of uint8 images rounded half to even (numpy's rint), as uint8."""
    n, h, w = images.shape
    means = images.astype(np.float64).reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return np.rint(means).astype(np.uint8)


def test_area_downsample_by_hand():
    images = _levels()
    images[0, :2, :2] = [[0, 0], [1, 1]]  # block mean 0.5 -> 0 (ties to even)
    images[0, :2, 2:4] = [[1, 1], [2, 2]]  # 1.5 -> 2
    images[0, 2:4, :2] = [[255, 255], [255, 254]]  # 254.75 -> 255
    x = to_model_range(images, 28)
    low = area_downsample(x, 14)
    want = _hand_downsample(images)
    assert want[0, 0, 0] == 0 and want[0, 0, 1] == 2 and want[0, 1, 0] == 255
    # exactly the sampler's k / 127.5 - 1 of the hand-made uint8 image (LowResDataset / generate use from_uint8)
    assert torch.equal(low, from_uint8(torch.from_numpy(want)[..., None]))
    # quantize=False is guided-diffusion's F.interpolate(mode="area"): the float block means
    area = area_downsample(x, 14, quantize=False)
    torch.testing.assert_close(area, F.interpolate(x, 14, mode="area"), atol=0, rtol=0)
    block = torch.from_numpy(images.astype(np.float64).reshape(3, 14, 2, 14, 2).mean(axis=(2, 4)) / 127.5 - 1)
    torch.testing.assert_close(area[:, 0].double(), block, atol=1e-6, rtol=0)
    assert (low - area).abs().max() <= 0.5 / 127.5 + 1e-6  # within half a level
    with pytest.raises(ConfigError, match="divide the image size 28"):
        area_downsample(x, 10)


def test_fashion_14_is_the_upsampler_low_res(tmp_path):
    """The first stage's training images (FashionMNIST at image_size 14) are the low_res the upsampler trains on."""
    images = _levels(4)
    torch.testing.assert_close(to_model_range(images, 14), area_downsample(to_model_range(images, 28), 14),
                               atol=0, rtol=0)
    m = SuperResTrainer(TINY_UP, COSINE)
    assert torch.equal(m.low_res(to_model_range(images, 28)), to_model_range(images, 14))
    with pytest.raises(DataError, match="divisor of 28"):
        to_model_range(images, 10)


def test_super_res_loss_feeds_low_res_through_the_sampling_adapter():
    torch.manual_seed(0)
    m = SuperResTrainer(TINY_UP, COSINE, ema_decay=0.0)
    images = _levels(4, seed=1)
    x0, y = to_model_range(images, 28), torch.tensor([0, 3, 9, 10])
    t, noise = torch.tensor([0, 10, 500, 999]), torch.randn(4, 1, 28, 28)
    seen = []
    forward = m.net.forward

    def spy(x, timesteps, low_res=None, y=None, class_emb=None):
        seen.append({"x": x, "low_res": low_res, "y": y})
        return forward(x, timesteps, low_res=low_res, y=y, class_emb=class_emb)

    m.net.forward = spy
    terms = m.losses(m.net, x0, y, t, noise)
    assert len(seen) == 1 and seen[0]["x"].shape == (4, 1, 28, 28) and torch.equal(seen[0]["y"], y)
    low = seen[0]["low_res"]
    assert low.shape == (4, 1, 14, 14) and low.dtype == torch.float32
    assert torch.equal(low, from_uint8(torch.from_numpy(_hand_downsample(images))[..., None]))
    # the sampler's path: low_res_inputs -> SamplingRun's bound denoiser -> ADMDenoiser -> network: the same loss
    kwargs = low_res_inputs(low, (1, 14, 14), 4, "cpu")
    run = SamplingRun(ADMDenoiser(m.net, m.process), model_kwargs=kwargs)
    want = hybrid_loss(run._network, x0, t, noise, y, m.vlb_weight)
    for k in ("mse", "vb", "loss"):
        torch.testing.assert_close(terms[k], want[k], atol=0, rtol=0)
    assert torch.equal(seen[-1]["low_res"], low)


@pytest.mark.parametrize("change, words", [
    ({"small_size": 10}, ["model.init_args.network.small_size 10", "divide the image size 28"]),
    ({"small_size": 28}, ["small_size 28", "smaller than"]),
    ({"small_size": None}, ["model.init_args.network.small_size", "must be set"]),
    ({"arch": "toy_mlp"}, ["arch", "SuperResModel"]),
])
def test_bad_upsampler_settings(change, words):
    flags = {k: v for k, v in {**TINY_UP, **change}.items() if v is not None and k != "arch"}
    with pytest.raises(ConfigError) as error:
        SuperResTrainer(flags, COSINE, **({"arch": change["arch"]} if "arch" in change else {}))
    assert all(w in str(error.value) for w in words), str(error.value)
    m = SuperResTrainer(TINY_UP, COSINE)
    with pytest.raises(ConfigError, match="data.init_args.image_size: 28"):
        m.low_res(torch.zeros(2, 1, 32, 32))


@pytest.mark.parametrize("config, preset", [("train_diffusion_14.yaml", "fashion_diffusion_14"),
                                            ("train_upsampler_14_28.yaml", "fashion_upsampler")])
def test_training_configs_build_the_presets(config, preset):
    """A trained file exported from the config replaces the preset: same flags, diffusion, labels and layout."""
    init = yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"]
    entry = PRESETS[preset]
    assert {k: entry["flags"][k] for k in init["network"]} == init["network"]
    assert {k: entry["diffusion"][k] for k in init["diffusion"]} == init["diffusion"]
    assert entry["sampling"] == {"num_classes": init["num_classes"], "null_label": init["num_classes"]}
    built = build_network(entry["kind"], init["network"], device="meta").state_dict()
    assert {k: v.shape for k, v in built.items()} == {
        k: v.shape for k, v in build_network(entry["kind"], entry["flags"], device="meta").state_dict().items()}


def _one_error_line(rc: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tailgen: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_cascade_fits_exports_and_samples(tmp_path, capsys):
    """2-step fits of a tiny first stage and a tiny upsampler (the shipped configs with smaller flags), exported with
    tools/export_weights.py; the first stage samples 14x14 images that the upsampler turns into 28x28 ones through
    data.low_res (2 respaced steps). Bad sizes end in one error line."""
    from export_weights import export

    data = tmp_path / "idx"
    data.mkdir()
    _tiny_folder(data, n=8, prefix="train")
    _tiny_folder(data, n=4, prefix="t10k")
    common = [f"--data.init_args.root={data}", "--data.init_args.batch_size=4", "--data.init_args.val_size=4",
              "--trainer.limit_val_batches=1", "--trainer.max_steps=2"]
    stage1 = ["fit", "--config", str(CONFIGS / "train_diffusion_14.yaml"), *common,
              "--model.init_args.network.num_res_blocks=1"]
    up = ["fit", "--config", str(CONFIGS / "train_upsampler_14_28.yaml"), *common,
          "--model.init_args.network.channel_mult=1,2"]  # no 7x7 level: no attention
    results = run_forked({
        "stage1": stage1,
        "up": up,
        "bad_small_size": [*up, "--model.init_args.network.small_size=10"],
        "bad_image_size": [*up, "--data.init_args.image_size=32"],
        "bad_first_stage_size": [*stage1, "--data.init_args.image_size=10"],
    }, tmp_path, jobs=2, timeout=300)
    for name in ("stage1", "up"):
        rc, _, err, _ = results[name]
        assert rc == 0, (name, err[-3000:])
    for name, words in {"bad_small_size": ["small_size 10", "divide the image size 28"],
                        "bad_image_size": ["32x32", "large_size is 28", "data.init_args.image_size: 28"],
                        "bad_first_stage_size": ["image_size", "divisor of 28", "10"],
                        }.items():
        rc, _, err, folder = results[name]
        line = _one_error_line(rc, err)
        assert all(w in line for w in words), (name, line)
        assert not list(folder.rglob("*.ckpt")) and not list(folder.rglob("samples.npz")), name

    ckpt1 = results["stage1"][3] / "runs" / "fashion_diffusion_14" / "checkpoints" / "last.ckpt"
    ckpt2 = results["up"][3] / "runs" / "fashion_upsampler" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt2, weights_only=True)["global_step"] == 2
    pt1, js1 = export(ckpt1, "fashion_diffusion_14", tmp_path / "w")
    pt2, js2 = export(ckpt2, "fashion_upsampler", tmp_path / "w")
    info = yaml.safe_load(js2.read_text())
    assert info["kind"] == "upsampler" and info["null_label"] == 10 and info["flags"]["small_size"] == 14
    assert info["trainer"]["quantize_low_res"] is True

    sampling = ["--model.init_args.diffusion.timestep_respacing=2", "--model.init_args.check_samples=false",
                "--model.init_args.progress=false", "--trainer.enable_progress_bar=false",
                "--data.init_args.num_samples=3", "--data.init_args.batch_size=3"]
    main(["predict", "--config", str(CONFIGS / "unguided_14.yaml"), *sampling,
          f"--model.init_args.network.init_args.checkpoint={pt1}",
          '--model.init_args.network.init_args.flags={"num_res_blocks": 1}',
          f"--writer.output_dir={tmp_path / 'unguided_14'}"])
    first = np.load(tmp_path / "unguided_14" / "samples.npz")
    assert first["arr_0"].shape == (3, 14, 14, 1) and first["arr_0"].dtype == np.uint8
    main(["predict", "--config", str(CONFIGS / "upsample_14_28.yaml"), *sampling,
          f"--model.init_args.network.init_args.checkpoint={pt2}",
          '--model.init_args.network.init_args.flags={"channel_mult": "1,2"}',
          f"--data.init_args.low_res={tmp_path / 'unguided_14' / 'samples.npz'}",
          f"--writer.output_dir={tmp_path / 'up'}"])
    out = np.load(tmp_path / "up" / "samples.npz")
    assert out["arr_0"].shape == (3, 28, 28, 1) and out["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(out["arr_1"], first["arr_1"])  # the first stage's labels, carried over
    assert capsys.readouterr().out.count("wrote 3 samples") == 2
