"""NetworkSpec: YAML-buildable description of a network (preset / flags / checkpoint)."""

import pytest
import torch

from conftest import FIXTURES
from tailgen.models.encoder import EncoderUNetModel
from tailgen.models.spec import NetworkSpec
from tailgen.models.unet import SuperResModel, UNetModel
from tailgen.utils import CheckpointError, ConfigError

TINY_UNET = dict(
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,1,1", attention_resolutions="16,8",
    num_head_channels=16, learn_sigma=True, class_cond=True, resblock_updown=True, use_new_attention_order=True,
    diffusion_steps=1000, noise_schedule="cosine",
)


def test_flags_resolved_and_diffusion_flags():
    spec = NetworkSpec(preset="64x64_diffusion", flags={"use_fp16": False, "timestep_respacing": "ddim25"})
    assert spec.kind == "model"
    assert spec.flags_resolved["num_channels"] == 192 and spec.flags_resolved["use_fp16"] is False
    assert spec.diffusion_flags["noise_schedule"] == "cosine" and spec.diffusion_flags["learn_sigma"] is True
    assert spec.diffusion_flags["timestep_respacing"] == "ddim25"
    assert NetworkSpec(preset="64x64_classifier").kind == "classifier"
    assert NetworkSpec(preset="64_256_upsampler").kind == "upsampler"


def test_build_from_checkpoint_is_frozen_and_exact():
    golden = torch.load(FIXTURES / "golden_io.pt")
    spec = NetworkSpec(flags=TINY_UNET, checkpoint=str(FIXTURES / "tiny_unet32.pt"))
    model = spec.build()
    assert isinstance(model, UNetModel) and not model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        out = model(golden["x"], golden["t"], golden["y"])
    torch.testing.assert_close(out, golden["unet_out"], atol=1e-5, rtol=1e-5)
    assert spec.diffusion_flags == {"diffusion_steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}


def test_random_weights_only_on_opt_in():
    flags = dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16,8",
                 classifier_channel_mult="1,2,2")
    with pytest.raises(ConfigError) as error:  # flags only, no weights: an error naming the key, not noise
        NetworkSpec(kind="classifier", flags=flags).build(key="model.init_args.classifier")
    assert "model.init_args.classifier.checkpoint" in str(error.value) and "random_init" in str(error.value)
    with pytest.raises(ConfigError, match=r"preset '64x64_diffusion' has no weights.*64x64_diffusion.pt"):
        NetworkSpec(preset="64x64_diffusion").build()
    with pytest.raises(ConfigError, match="drop one"):
        NetworkSpec(kind="classifier", flags=flags, checkpoint="w.pt", random_init=True)
    classifier = NetworkSpec(kind="classifier", flags=flags, random_init=True).build()
    assert isinstance(classifier, EncoderUNetModel)
    upsampler = NetworkSpec(kind="upsampler", flags=dict(large_size=32, num_channels=32, num_res_blocks=1,
                                                         channel_mult="1,1", attention_resolutions="16"),
                            random_init=True).build()
    assert isinstance(upsampler, SuperResModel)
    shipped = NetworkSpec(preset="fashion_noisy_classifier")  # tailgen's own presets still load their weights
    assert shipped.weights and shipped.weights.endswith("fashion_noisy_classifier.pt")


def test_spec_errors(tmp_path):
    with pytest.raises(ConfigError) as error:
        NetworkSpec(preset="64x64")
    assert "64x64_diffusion" in str(error.value) and "128_512_upsampler" in str(error.value)
    with pytest.raises(ConfigError) as error:
        NetworkSpec(kind="denoiser", flags={"image_size": 32})
    assert "model, classifier, upsampler" in str(error.value)
    with pytest.raises(CheckpointError) as error:  # the wrong kind of file, named by the spec's build
        NetworkSpec(flags=TINY_UNET, checkpoint=str(FIXTURES / "tiny_classifier32.pt")).build()
    assert "classifier file given as a diffusion model" in str(error.value)


def test_jsonargparse_builds_spec_from_yaml():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--network", type=NetworkSpec)
    yaml = "network:\n  class_path: tailgen.models.spec.NetworkSpec\n  init_args:\n    preset: 64x64_classifier\n    checkpoint: /x/64x64_classifier.pt\n"
    config = parser.parse_string(yaml)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    spec = instantiate(config).network
    assert isinstance(spec, NetworkSpec) and spec.kind == "classifier" and spec.checkpoint == "/x/64x64_classifier.pt"
