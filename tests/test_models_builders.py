"""create_* builders (guided-diffusion flags), forward-call contracts, fp16 conversion, pools, attention order."""

import json

import pytest
import torch

from conftest import FIXTURES
from tailgen.models.adm import (
    DEFAULT_CHANNEL_MULT, create_classifier, create_model, create_superres_model, flags_from_string, model_defaults,
)
from tailgen.models.attention import CPU_SDPA_MIN_TOKENS, qkv_attention
from tailgen.models.unet import UNetModel
from tailgen.utils import ConfigError

README_64 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
    "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
)
FASHION = dict(image_size=28, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
               attention_resolutions="14,7", num_head_channels=32, class_cond=True, num_classes=10, learn_sigma=True)


def test_pasted_readme_flags_build_the_reference_layout():
    with torch.device("meta"):
        model = create_model(**flags_from_string(README_64))
    manifest = json.loads((FIXTURES / "manifest_64x64_diffusion.json").read_text())["params"]
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(manifest.items())
    assert model.dtype == torch.float16  # use_fp16 True converts the torso convs
    assert model.time_embed[0].weight.dtype == model.label_emb.weight.dtype == model.out[2].weight.dtype == torch.float32


def test_unknown_flag_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        create_model(image_size=64, num_channel=128)
    message = str(error.value)
    assert "num_channel" in message and "num_channels" in message and "attention_resolutions" in message
    with pytest.raises(ConfigError) as error:
        create_classifier(classifier_widht=64)
    assert "classifier_widht" in str(error.value) and "classifier_width" in str(error.value)


def test_diffusion_flags_are_accepted_and_ignored():
    with torch.device("meta"):
        model = create_model(image_size=64, diffusion_steps=4000, noise_schedule="cosine", timestep_respacing="250",
                             sigma_small=True, predict_xstart=True, rescale_timesteps=True, use_kl=True,
                             rescale_learned_sigmas=True)
        classifier = create_classifier(image_size=64, diffusion_steps=1000, classifier_scale=1.0, learn_sigma=True)
    assert isinstance(model, UNetModel) and classifier.out_channels == 1000


@pytest.mark.parametrize("size", sorted(DEFAULT_CHANNEL_MULT))
def test_builtin_channel_mult(size):
    with torch.device("meta"):
        model = create_model(image_size=size, num_channels=64, channel_mult="")
        explicit = create_model(image_size=size, num_channels=64, channel_mult=DEFAULT_CHANNEL_MULT[size])
    assert model.channel_mult == DEFAULT_CHANNEL_MULT[size]
    assert [tuple(v.shape) for v in model.state_dict().values()] == [tuple(v.shape) for v in explicit.state_dict().values()]


def test_channel_mult_forms_and_sizes():
    with torch.device("meta"):
        assert create_model(image_size=32, channel_mult="1,2,2").channel_mult == (1, 2, 2)
        assert create_model(image_size=32, channel_mult=[1, 2, 2]).channel_mult == (1, 2, 2)
    with pytest.raises(ConfigError) as error:
        create_model(image_size=32)
    assert "image_size=32" in str(error.value) and "channel_mult" in str(error.value)
    with pytest.raises(ConfigError) as error:
        create_model(image_size=30, channel_mult="1,2,2")
    assert "not divisible" in str(error.value)
    with pytest.raises(ConfigError):
        create_model(image_size=32, channel_mult="1,2,2", class_cond="maybe")


def test_string_values_are_converted():
    with torch.device("meta"):
        model = create_model(image_size="32", channel_mult="1,2", class_cond="True", learn_sigma="False", num_classes="10")
    assert model.num_classes == 10 and model.out_channels == 3


def test_label_contract():
    model = create_model(**FASHION).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert model(x, torch.tensor([3, 900]), torch.tensor([0, 9])).shape == (2, 2, 28, 28)
        assert model(x, 500, torch.tensor([0, 9])).shape == (2, 2, 28, 28)  # scalar timestep
        with pytest.raises(ConfigError) as error:
            model(x, torch.tensor([3, 900]))
        assert "class-conditional" in str(error.value) and "num_classes=10" in str(error.value)
        with pytest.raises(ConfigError) as error:
            model(x, torch.tensor([3, 900]), torch.tensor([0, 10]))
        assert "label 10 is out of range" in str(error.value) and "0..9" in str(error.value)
        unconditional = create_model(**{**FASHION, "class_cond": False})
        with pytest.raises(ConfigError) as error:
            unconditional(x, torch.tensor([3, 900]), torch.tensor([0, 1]))
        assert "unconditional" in str(error.value)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    small = {**FASHION, "image_size": 16, "channel_mult": "1,2", "attention_resolutions": "8"}
    plain = create_model(**small)
    checkpointed = create_model(**small, use_checkpoint=True)
    for p in plain.out.parameters():  # zero-initialised output: make the gradient reach the torso
        torch.nn.init.normal_(p, std=0.1)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 700]), torch.tensor([1, 2])
    grads = []
    for model in (plain, checkpointed):
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        grads.append(model.input_blocks[1][0].in_layers[2].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_fp16_conversion_rule_and_forward():
    golden = torch.load(FIXTURES / "golden_io.pt")
    model = create_model(**golden["info"]["unet_config"])
    model.load_state_dict(torch.load(FIXTURES / "tiny_unet32.pt"))
    model.convert_to_fp16()
    halves = [k for k, v in model.state_dict().items() if v.dtype == torch.float16]
    assert halves and all(k.split(".")[0] in ("input_blocks", "middle_block", "output_blocks") for k in halves)
    assert not any(".norm." in k or "in_layers.0" in k or "emb_layers" in k for k in halves)
    with torch.no_grad():
        out = model(golden["x"], golden["t"], golden["y"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, golden["unet_out"], atol=0.1, rtol=0.05)  # fp16 torso, fp32 head
    model.convert_to_fp32()
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


@pytest.mark.parametrize("pool, feature_dim", [("adaptive", 64), ("attention", 64), ("spatial", 2048), ("spatial_v2", 2048)])
def test_classifier_pools(pool, feature_dim):
    classifier = create_classifier(image_size=32, in_channels=1, num_classes=10, classifier_width=32, classifier_depth=1,
                                   classifier_attention_resolutions="8", classifier_channel_mult="1,2,2",
                                   classifier_pool=pool).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        logits, features = classifier.forward_with_features(x, torch.tensor([0, 1, 999]))
        assert logits.shape == (3, 10) and features.shape == (3, feature_dim) == (3, classifier.feature_dim)
        torch.testing.assert_close(classifier(x, torch.tensor([0, 1, 999])), logits)
    if pool == "adaptive":  # zero-initialised head, as the reference
        assert torch.count_nonzero(logits) == 0


def test_superres_requires_low_res():
    model = create_superres_model(large_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,1",
                                  attention_resolutions="16")
    with pytest.raises(ConfigError) as error:
        model(torch.randn(1, 3, 32, 32), torch.tensor([5]))
    assert "low_res" in str(error.value)
    with pytest.raises(ConfigError) as error:
        create_superres_model(image_size=256)
    assert "large_size" in str(error.value)


def _reference_attention(qkv, heads, new_order):
    """The reference formula written out: q, k scaled by ch^-1/4 each, float32 softmax, einsum."""
    batch, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (t.reshape(batch * heads, ch, length) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(batch * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / ch**0.25
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


@pytest.mark.parametrize("use_sdpa", [False, True])
@pytest.mark.parametrize("new_order", [False, True])
def test_attention_head_orders(new_order, use_sdpa):
    qkv = torch.randn(2, 3 * 4 * 16, 50, generator=torch.Generator().manual_seed(0))
    out = qkv_attention(qkv, 4, new_order, use_sdpa=use_sdpa)
    torch.testing.assert_close(out, _reference_attention(qkv, 4, new_order), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, _reference_attention(qkv, 4, not new_order), atol=1e-3)


def test_model_defaults_are_the_reference_ones():
    defaults = model_defaults()
    assert defaults["num_channels"] == 128 and defaults["num_heads"] == 4 and defaults["attention_resolutions"] == "16,8"
    assert defaults["use_scale_shift_norm"] is True and defaults["in_channels"] == 3 and defaults["num_classes"] == 1000


def _attention_kernels(qkv: torch.Tensor, use_sdpa) -> set[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        qkv_attention(qkv, 2, True, use_sdpa=use_sdpa)
    return {event.name for event in prof.events()}


def test_cpu_sdpa_takes_the_fused_kernel():
    """The (B, heads, ch, T) views are made contiguous: with a strided last dim CPU SDPA silently runs its math
    path (bmm + softmax), which made `attention: sdpa` no faster than the matmul form."""
    names = _attention_kernels(torch.randn(1, 3 * 2 * 8, 64), use_sdpa=True)
    assert any("flash_attention" in name for name in names), sorted(names)
    assert "aten::bmm" not in names


@pytest.mark.parametrize("tokens", [CPU_SDPA_MIN_TOKENS - 1, CPU_SDPA_MIN_TOKENS])
def test_auto_attention_on_cpu_by_length(tokens):
    qkv = torch.randn(1, 3 * 2 * 4, tokens, generator=torch.Generator().manual_seed(0))
    names = _attention_kernels(qkv, use_sdpa=None)
    assert any("flash_attention" in name for name in names) == (tokens >= CPU_SDPA_MIN_TOKENS)
    torch.testing.assert_close(qkv_attention(qkv, 2, True), _reference_attention(qkv, 2, True), atol=1e-6, rtol=1e-5)
