"""Presets build on the meta device with the official key/shape layouts (fixtures README 1, 7.1)."""

import json
import math

import pytest
import torch

from conftest import FIXTURES
from tailgen.models.attention import AttentionBlock
from tailgen.models.encoder import EncoderUNetModel
from tailgen.models.presets import PRESETS, build_preset, get_preset, preset_manifest
from tailgen.models.unet import SuperResModel, UNetModel
from tailgen.utils import ConfigError

MANIFESTS = {
    "64x64_diffusion": "manifest_64x64_diffusion.json",
    "64x64_classifier": "manifest_64x64_classifier.json",
    "64_256_upsampler": "manifest_64_256_upsampler.json",
}
# Parameter counts of the official files (paper Table 12 for the classifiers: 65M, 43M, 54M, 54M).
PARAM_COUNTS = {
    "64x64_diffusion": 295_904_454,
    "64x64_classifier": 65_438_568,
    "64_256_upsampler": 311_795_910,
    "128x128_classifier": 42_568_040,
    "256x256_classifier": 54_096_360,
    "512x512_classifier": 54_448_360,
}
OFFICIAL = [
    "64x64_diffusion", "64x64_classifier", "128x128_diffusion", "128x128_classifier", "256x256_diffusion",
    "256x256_diffusion_uncond", "256x256_classifier", "512x512_diffusion", "512x512_classifier",
    "64_256_upsampler", "128_512_upsampler",
]
CLASSES = {"model": UNetModel, "classifier": EncoderUNetModel, "upsampler": SuperResModel}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_preset_equals_reference_manifest(name):
    manifest = json.loads((FIXTURES / MANIFESTS[name]).read_text())
    model = build_preset(name, device="meta")
    layout = [(key, list(value.shape)) for key, value in model.state_dict().items()]
    assert layout == list(manifest["params"].items())  # key order and shapes
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    # the preset's flags are the reference config (use_fp16 as the README sets it; the manifest was built in fp32)
    flags = PRESETS[name]["flags"]
    assert {k: v for k, v in manifest["config"].items() if k in flags and k != "use_fp16"} == {
        k: flags[k] for k in manifest["config"] if k in flags and k != "use_fp16"
    }
    fp16 = manifest["meta"]["fp16_check"]
    state = build_preset(name, device="meta", **{"classifier_use_fp16" if "classifier" in name else "use_fp16": True}).state_dict()
    assert sum(t.dtype == torch.float16 for t in state.values()) == fp16["after_convert_to_fp16_num_float16_tensors"]
    assert list(state) == list(manifest["params"])


@pytest.mark.parametrize("name", OFFICIAL)
def test_every_official_preset_builds_on_meta(name):
    preset = get_preset(name)
    assert preset["file"] == f"{name}.pt" and preset["url"].endswith(f"/{name}.pt")
    model = build_preset(name, device="meta")
    assert isinstance(model, CLASSES[preset["kind"]])
    assert all(p.is_meta for p in model.parameters())
    layout = preset_manifest(name)
    if name in PARAM_COUNTS:
        assert sum(math.prod(shape) for shape in layout.values()) == PARAM_COUNTS[name]
    if preset["kind"] == "classifier":
        assert layout["out.2.c_proj.weight"] == (1000, 512, 1)  # width 128 x last channel_mult 4
        assert layout["out.2.positional_embedding"][1] == 65  # 8x8 grid + mean token
    else:
        assert layout["out.2.weight"][0] == 6  # learned sigma
        assert ("label_emb.weight" in layout) == (name != "256x256_diffusion_uncond")
    if preset["kind"] == "upsampler":
        assert layout["input_blocks.0.0.weight"][1] == 6


def test_preset_details():
    assert PRESETS["64x64_diffusion"]["diffusion"]["noise_schedule"] == "cosine"
    assert PRESETS["256x256_diffusion"]["diffusion"]["noise_schedule"] == "linear"
    assert PRESETS["512x512_diffusion"]["flags"]["use_fp16"] is False
    assert PRESETS["256x256_diffusion_uncond"]["sampling"]["classifier_scale"] == 10.0
    assert PRESETS["64x64_classifier"]["flags"]["classifier_depth"] == 4
    # 128 -> 512 upsampler: attention at 32 and 16 only, 64-channel heads
    model = build_preset("128_512_upsampler")
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert blocks and all(m.num_heads == m.channels // 64 and not m.use_new_attention_order for m in blocks)
    assert model.attention_resolutions == (16, 32)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as error:
        get_preset("64x64_difusion")
    assert "64x64_difusion" in str(error.value) and "64x64_diffusion" in str(error.value)
