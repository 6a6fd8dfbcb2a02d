"""The module path: GuidedDiffusion reproduces the reference trajectories, and `tailgen predict` works end to
end on the tiny fixture models (no duplicates, batch-size invariant, user guidance from YAML, clear errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import FIXTURES
from guidance_stubs import CountingGuidance

from tailgen.cli import main
from tailgen.diffusion.noise import ReplayNoise
from tailgen.guidance import ClassifierGuidance
from tailgen.models.spec import NetworkSpec
from tailgen.module.guided import GuidedDiffusion

UNET_FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,1,1", attention_resolutions="16,8",
                  num_head_channels=16, learn_sigma=True, class_cond=True, use_scale_shift_norm=True,
                  resblock_updown=True, use_new_attention_order=True, dropout=0.0, diffusion_steps=1000,
                  noise_schedule="cosine")
CLASSIFIER_FLAGS = dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16,8",
                        classifier_channel_mult="1,2,2")


def tiny_module(respacing: str, sampler: str, guided: bool, eta: float = 0.0) -> GuidedDiffusion:
    return GuidedDiffusion(
        network=NetworkSpec(flags=UNET_FLAGS, checkpoint=str(FIXTURES / "tiny_unet32.pt")),
        classifier=NetworkSpec(kind="classifier", flags=CLASSIFIER_FLAGS, checkpoint=str(FIXTURES / "tiny_classifier32.pt")),
        diffusion={"timestep_respacing": respacing}, sampler=sampler, eta=eta, progress=False,
        check_samples=False,  # random fixture networks: trajectories are compared, the images mean nothing
        guidances={"cg": ClassifierGuidance(scale=1.0)} if guided else None,
    )


@pytest.mark.parametrize("run", ["ddpm10_guided", "ddim10_eta0_guided", "ddim10_eta0.5_guided", "ddpm10_unguided"])
def test_module_reproduces_reference_trajectories(run):
    golden = torch.load(FIXTURES / "golden_sampling.pt")
    ref = golden["runs"][run]
    sampler = "ddim" if ref["sampler"].startswith("ddim") else "ddpm"
    module = tiny_module(ref["timestep_respacing"], sampler, ref["guided"], eta=ref["eta"] or 0.0)
    xs = []
    out = module.sample(golden["y"], noise=ReplayNoise(golden["noise_init"], golden["step_noises"]),
                        callback=lambda info: xs.append(info["x"].clone()))
    assert len(xs) == 10
    for k, x in enumerate(xs):
        torch.testing.assert_close(x, ref["x_seq"][k], atol=1e-4, rtol=0, msg=f"{run}: step {k}")
    torch.testing.assert_close(out, ref["final"], atol=1e-4, rtol=0)


def test_the_guidance_stack_is_validated_at_construction_only():
    module = GuidedDiffusion(
        network=NetworkSpec(flags=UNET_FLAGS, checkpoint=str(FIXTURES / "tiny_unet32.pt")),
        classifier=NetworkSpec(kind="classifier", flags=CLASSIFIER_FLAGS, checkpoint=str(FIXTURES / "tiny_classifier32.pt")),
        diffusion={"timestep_respacing": "2"}, progress=False, check_samples=False,
        guidances={"cg": CountingGuidance(scale=1.0)})
    assert module.guidances["cg"].validations == 1
    for seeds in ([1, 2], [3, 4]):  # two batches
        module.predict_step({"label": torch.tensor([0, 1]), "seed": torch.tensor(seeds), "index": torch.tensor([0, 1])})
    assert module.guidances["cg"].validations == 1


# ------------------------------------------------------------------------------------------------ CLI


def write_config(tmp_path, *, guidances=None, classifier=True, data=None, name="cfg.yaml", out="out"):
    model = {
        "network": {"flags": UNET_FLAGS, "checkpoint": str(FIXTURES / "tiny_unet32.pt")},
        "diffusion": {"timestep_respacing": "4"},
        "sampler": "ddpm",
        "progress": False,
        "check_samples": False,  # random fixture networks: their images mean nothing (saturation is expected)
        "guidances": guidances if guidances is not None else {
            "cg": {"class_path": "tailgen.guidance.ClassifierGuidance", "init_args": {"scale": 1.0}},
            "tail": {"class_path": "tailgen.guidance.LowDensityGuidance", "init_args": {"variant": "target", "scale": 0.5}},
        },
    }
    if classifier:
        model["classifier"] = {"kind": "classifier", "flags": CLASSIFIER_FLAGS,
                               "checkpoint": str(FIXTURES / "tiny_classifier32.pt")}
    cfg = {
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "tailgen.module.guided.GuidedDiffusion", "init_args": model},
        "data": {"class_path": "tailgen.module.sampling_data.SamplingDataModule",
                 "init_args": {"num_samples": 5, "batch_size": 2, "seed": 3, **(data or {})}},
        "writer": {"output_dir": str(tmp_path / out)},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_predict_end_to_end_batch_size_invariant(tmp_path):
    config = write_config(tmp_path)
    main(["predict", "--config", str(config)])
    main(["predict", "--config", str(config), "--data.init_args.batch_size=3", f"--writer.output_dir={tmp_path / 'b3'}"])
    a, b = np.load(tmp_path / "out" / "samples.npz"), np.load(tmp_path / "b3" / "samples.npz")
    assert a["arr_0"].shape == (5, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].dtype == np.int64 and list(a["indices"]) == [0, 1, 2, 3, 4]
    assert len({img.tobytes() for img in a["arr_0"]}) == 5, "duplicated samples"
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # same seeds -> same images
    assert (tmp_path / "out" / "grid.png").stat().st_size > 0


def test_user_guidance_from_yaml(tmp_path):
    """A guidance defined outside the package (tests/user_guidance.py) is loaded by class_path."""
    guidances = {"sharpen": {"class_path": "user_guidance.Sharpen", "init_args": {"scale": 0.3}}}
    config = write_config(tmp_path, guidances=guidances, classifier=False, data={"num_samples": 2})
    # the random fixture networks' noise images, unsharp-masked, saturate: the sample check would (rightly) refuse them
    main(["predict", "--config", str(config), "--model.init_args.check_samples=false"])
    assert np.load(tmp_path / "out" / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)


@pytest.mark.parametrize("case, message", [
    ("unknown_guidance", "tailgen.guidance.NoSuchGuidance"),
    ("wrong_type", "scale"),
    ("cg_without_classifier", "needs a noisy classifier"),
    ("cfg_without_uncond", "unconditional path"),
    ("label_out_of_range", "label 1000 is out of range"),
])
def test_bad_configs_give_one_clear_message(tmp_path, capsys, case, message):
    kwargs, extra = {}, []
    if case == "unknown_guidance":
        kwargs["guidances"] = {"x": {"class_path": "tailgen.guidance.NoSuchGuidance"}}
    elif case == "wrong_type":
        extra = ["--model.init_args.guidances.cg.init_args.scale=strong"]
    elif case == "cg_without_classifier":
        kwargs["classifier"] = False
    elif case == "cfg_without_uncond":
        kwargs["guidances"] = {"cfg": {"class_path": "tailgen.guidance.ClassifierFreeGuidance", "init_args": {"scale": 1.0}}}
    elif case == "label_out_of_range":
        kwargs["data"] = {"labels": 1000}
    config = write_config(tmp_path, **kwargs)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(config), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err


@pytest.mark.parametrize("flags", [["--trainer.precision=bf16-mixed"], ["--trainer.inference_mode=true"]],
                         ids=["bf16-mixed", "inference_mode"])
def test_guided_predict_under_precision_and_inference_mode(tmp_path, flags):
    """Classifier guidance needs gradients: it works under autocast and when the trainer runs in inference mode."""
    config = write_config(tmp_path, data={"num_samples": 2})
    main(["predict", "--config", str(config), *flags])
    images = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert images.shape == (2, 32, 32, 3) and images.std() > 0
