"""Safe loading (weights_only only) and one clear CheckpointError per kind of wrong file."""

import json

import pytest
import torch

from conftest import FIXTURES
from tailgen.models.adm import create_classifier, create_model
from tailgen.models.checkpoint import extract_state_dict, load_checkpoint, load_into, load_state_dict_file
from tailgen.models.presets import build_preset
from tailgen.utils import CheckpointError

UNET_FLAGS = dict(
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,1,1", attention_resolutions="16,8",
    num_head_channels=16, learn_sigma=True, class_cond=True, resblock_updown=True, use_new_attention_order=True,
)


class NotATensor:  # a class defined here: weights_only loading must refuse to import it
    def __init__(self):
        self.payload = torch.zeros(2)


def meta_state_dict(manifest_file):
    """A state dict of meta tensors with the shapes of a reference manifest (no memory)."""
    params = json.loads((FIXTURES / manifest_file).read_text())["params"]
    return {key: torch.empty(shape, device="meta") for key, shape in params.items()}


def test_missing_file_names_path_and_source(tmp_path):
    path = tmp_path / "64x64_diffusion.pt"
    with pytest.raises(CheckpointError) as error:
        load_state_dict_file(path)
    message = str(error.value)
    assert "not found" in message and str(path) in message
    assert "openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_diffusion.pt" in message


def test_truncated_file(tmp_path):
    path = tmp_path / "tiny_unet32.pt"
    data = (FIXTURES / "tiny_unet32.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_state_dict_file(path)
    assert "truncated or corrupt" in str(error.value) and str(path) in str(error.value)


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "with_code.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError) as error:
        load_state_dict_file(path)
    message = str(error.value)
    assert "never unpickles code" in message and "NotATensor" in message
    assert "torch.save" in message and "state dict" in message  # how to re-save


def test_classifier_file_given_as_model():
    model = create_model(**UNET_FLAGS)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(model, FIXTURES / "tiny_classifier32.pt")
    message = str(error.value)
    assert "a classifier file given as a diffusion model" in message
    assert "missing keys" in message and "output_blocks" in message and "shape mismatches" in message
    assert "tiny_classifier32.pt" in message


def test_model_file_given_as_classifier():
    classifier = create_classifier(image_size=32, classifier_width=32, classifier_depth=1,
                                   classifier_attention_resolutions="16,8", classifier_channel_mult="1,2,2")
    with pytest.raises(CheckpointError) as error:
        load_into(classifier, torch.load(FIXTURES / "tiny_unet32.pt"))
    assert "a model file given as a classifier" in str(error.value)
    assert "unexpected keys" in str(error.value)


def test_other_resolution_names_the_fitting_preset():
    # the 64x64 classifier's layout (from the reference manifest) loaded into the 128x128 classifier
    with pytest.raises(CheckpointError) as error:
        load_into(build_preset("128x128_classifier"), meta_state_dict("manifest_64x64_classifier.json"))
    message = str(error.value)
    assert "fits preset '64x64_classifier' exactly" in message
    assert "missing keys" in message and "unexpected keys" in message and "shape mismatches" in message
    assert "given as" not in message  # same kind, different resolution


def test_unconditional_file_into_conditional_preset():
    state = build_preset("256x256_diffusion_uncond", device="meta").state_dict()
    with pytest.raises(CheckpointError) as error:
        load_into(build_preset("256x256_diffusion"), state)
    message = str(error.value)
    assert "1 missing keys: label_emb.weight" in message and "'256x256_diffusion_uncond'" in message


def test_upsampler_file_given_as_model():
    with pytest.raises(CheckpointError) as error:
        load_into(build_preset("256x256_diffusion"), meta_state_dict("manifest_64_256_upsampler.json"))
    message = str(error.value)
    assert "an upsampler file given as a diffusion model" in message
    assert "'64_256_upsampler'" in message


def test_long_lists_are_truncated_with_counts():
    with pytest.raises(CheckpointError) as error:
        load_into(create_model(**UNET_FLAGS), {"foo.weight": torch.zeros(1)})
    message = str(error.value)
    assert "215 missing keys" in message and "more)" in message and "1 unexpected keys: foo.weight" in message


def test_fp16_file_loads_into_fp32_and_meta_models():
    state = load_state_dict_file(FIXTURES / "tiny_unet32.pt")
    assert all(t.dtype == torch.float16 for t in state.values())
    with torch.device("meta"):
        model = create_model(**UNET_FLAGS)
    load_into(model, state)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    reference = create_model(**UNET_FLAGS)
    reference.load_state_dict(state)
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), key
    # an fp16-converted torso keeps its dtypes when loading a float32 state dict
    half = create_model(**UNET_FLAGS, use_fp16=True)
    load_into(half, reference.state_dict())
    assert half.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert half.out[2].weight.dtype == torch.float32 and half.label_emb.weight.dtype == torch.float32


def test_wrappers_and_prefixes(tmp_path):
    state = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    lightning = {"state_dict": {**{f"net.{k}": v for k, v in state.items()}, **{f"ema.{k}": v + 1 for k, v in state.items()}},
                 "epoch": 3, "optimizer_states": []}
    path = tmp_path / "last.ckpt"
    torch.save(lightning, path)
    ema = load_state_dict_file(path, prefix="ema.")
    assert list(ema) == ["a.weight", "b.bias"] and torch.equal(ema["a.weight"], torch.full((2,), 2.0))
    assert list(extract_state_dict(lightning, prefix="net.")) == ["a.weight", "b.bias"]
    assert list(extract_state_dict({"model": state})) == list(state)
    assert list(extract_state_dict({f"module.{k}": v for k, v in state.items()})) == list(state)
    with pytest.raises(CheckpointError) as error:
        extract_state_dict(lightning, prefix="teacher.")
    assert "net." in str(error.value) and "ema." in str(error.value)
    with pytest.raises(CheckpointError) as error:  # prefixed keys without prefix= : the error says which prefix
        load_into(torch.nn.Linear(2, 1), {f"net.{k}": v for k, v in torch.nn.Linear(2, 1).state_dict().items()})
    assert "prefix=" in str(error.value) and "net." in str(error.value)


def test_empty_random_and_safetensors_files(tmp_path, monkeypatch):
    import json
    import struct
    import sys
    import types

    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        load_state_dict_file(tmp_path / "empty.pt")
    (tmp_path / "random.pt").write_bytes(bytes(range(7, 256)) * 4)
    with pytest.raises(CheckpointError, match="is not a PyTorch file") as error:
        load_state_dict_file(tmp_path / "random.pt")
    assert "pickled" not in str(error.value)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match="is a safetensors file.*pip install safetensors"):
        load_state_dict_file(path)
    fake = types.ModuleType("safetensors.torch")  # installed: loaded through safetensors (tensors only)
    fake.load_file = lambda name, device="cpu": {"w": torch.zeros(2)}
    monkeypatch.setitem(sys.modules, "safetensors", types.ModuleType("safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", fake)
    assert list(load_state_dict_file(path)) == ["w"]


def test_weights_saved_channels_last_load_row_major():
    """A file saved from a channels_last network keeps NHWC strides where the layout is ambiguous (one input
    channel, 1x1 kernels); loaded into a meta-built network they must not turn the network's activations NHWC
    (its GroupNorms are several times slower there on the CPU; issue 11)."""
    flags = {**UNET_FLAGS, "in_channels": 1, "channel_mult": "1,2"}
    torch.manual_seed(0)
    trained = create_model(**flags).to(memory_format=torch.channels_last)
    state = trained.state_dict()
    assert state["input_blocks.0.0.weight"].stride() == (9, 1, 3, 1)  # what torch.save keeps
    with torch.device("meta"):
        model = create_model(**flags)
    load_into(model, state)
    for key, value in model.state_dict().items():
        assert value.stride() == torch.empty(value.shape).stride(), key
        assert torch.equal(value, state[key]), key
    features = model.input_blocks[0](torch.randn(2, 1, 32, 32), None)
    assert features.stride() == torch.empty(features.shape).stride()  # NCHW activations


def test_shipped_weights_load_row_major():
    from tailgen.models.spec import NetworkSpec

    for name, kind in (("fashion_diffusion", "model"), ("fashion_noisy_classifier", "classifier")):
        net = NetworkSpec(preset=name, kind=kind).build()
        odd = [key for key, p in net.named_parameters() if p.stride() != torch.empty(p.shape).stride()]
        assert not odd, (name, odd)
