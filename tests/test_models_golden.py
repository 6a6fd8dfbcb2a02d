"""The tiny reference networks load strictly and reproduce guided-diffusion's outputs (fixtures README 2, 3, 7)."""

import pytest
import torch

from conftest import FIXTURES
from tailgen.models.adm import create_classifier, create_model, create_superres_model

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def golden():
    return torch.load(FIXTURES / "golden_io.pt")


@pytest.fixture(scope="module")
def golden_sr():
    return torch.load(FIXTURES / "golden_upsampler_io.pt")


def _load(model, name):
    state = torch.load(FIXTURES / name)
    assert list(model.state_dict()) == list(state)  # same keys, same order
    model.load_state_dict(state, strict=True)  # float16 file -> float32 module (exact values)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model.eval()


def tiny_unet(golden):
    return _load(create_model(**golden["info"]["unet_config"]), "tiny_unet32.pt")


def tiny_classifier(golden):
    config = dict(golden["info"]["classifier_config"])
    channel_mult = config.pop("channel_mult")
    return _load(create_classifier(**config, classifier_channel_mult=tuple(channel_mult)), "tiny_classifier32.pt")


def test_unet_output(golden):
    model = tiny_unet(golden)
    assert sum(p.numel() for p in model.parameters()) == 652_806
    with torch.no_grad():
        out = model(golden["x"], golden["t"], golden["y"])
    torch.testing.assert_close(out, golden["unet_out"], **TOL)
    with torch.no_grad():  # float timesteps with integer values give the same embedding
        out_float = model(golden["x"], golden["t"].float(), golden["y"])
    torch.testing.assert_close(out_float, golden["unet_out"], **TOL)


def test_classifier_logits_and_guidance_gradient(golden):
    model = tiny_classifier(golden)
    assert sum(p.numel() for p in model.parameters()) == 644_200
    x = golden["x"].clone().requires_grad_(True)
    logits = model(x, golden["t"])
    selected = torch.log_softmax(logits, dim=-1)[torch.arange(len(golden["y"])), golden["y"]]
    grad = torch.autograd.grad(selected.sum(), x)[0] * golden["classifier_scale"]
    torch.testing.assert_close(logits, golden["classifier_logits"], **TOL)
    torch.testing.assert_close(selected, golden["classifier_log_probs_selected"], **TOL)
    torch.testing.assert_close(grad, golden["classifier_grad"], **TOL)


def test_classifier_features_feed_the_head(golden):
    model = tiny_classifier(golden)
    with torch.no_grad():
        logits, features = model.forward_with_features(golden["x"], golden["t"])
        assert features.shape == (4, model.feature_dim) == (4, 64)
        torch.testing.assert_close(model.forward_features(golden["x"], golden["t"]), features)
    torch.testing.assert_close(logits, golden["classifier_logits"], **TOL)


@pytest.mark.parametrize("low_res_key, out_key", [("low_res", "out"), ("low_res_8", "out_low_res_8")])
def test_upsampler_output(golden_sr, low_res_key, out_key):
    config = dict(golden_sr["info"]["sr_config"], channel_mult=tuple(golden_sr["info"]["channel_mult"]))
    model = _load(create_superres_model(**config), "tiny_upsampler32.pt")
    seen = {}
    hook = model.input_blocks[0][0].register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        out = model(golden_sr["x"], golden_sr["t"], low_res=golden_sr[low_res_key], y=golden_sr["y"])
    hook.remove()
    torch.testing.assert_close(seen["x"][:, :3], golden_sr["x"], atol=0, rtol=0)
    torch.testing.assert_close(seen["x"][:, 3:], golden_sr[f"{low_res_key}_upsampled"], atol=0, rtol=0)
    torch.testing.assert_close(out, golden_sr[out_key], **TOL)
