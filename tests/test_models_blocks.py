"""Sampling fast paths of the ADM blocks (issue 11) are bit-identical to the plain PyTorch forms they replace:
nearest 2x upsampling, 2x2 average pooling, the in-place ResBlock forward without autograd."""

import pytest
import torch
import torch.nn.functional as F

from tailgen.models.adm import create_model
from tailgen.models.blocks import Downsample, ResBlock, Upsample, average_2x2, nearest_2x

SHAPES = [(2, 3, 8, 8), (1, 1, 7, 5), (3, 64, 14, 14), (2, 5, 1, 1)]


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", SHAPES)
def test_nearest_2x_is_interpolate(shape):
    x = randn(*shape)
    assert torch.equal(nearest_2x(x), F.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 1, 2, 6), (3, 64, 28, 28)])
def test_average_2x2_is_avg_pool(shape):
    x = randn(*shape) * 100
    assert torch.equal(average_2x2(x), F.avg_pool2d(x, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_resampling_modules_match_torch_with_and_without_autograd(layout, dtype):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    up, down = Upsample(4, False), Downsample(4, False)
    for x in (randn(2, 4, 6, 6), randn(2, 4, 7, 5)):  # odd sizes: avg_pool2d floors, the module falls back
        x = x.to(dtype).contiguous(memory_format=fmt)
        with torch.no_grad():
            assert torch.equal(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
            assert torch.equal(down(x), F.avg_pool2d(x, 2, 2))
        x_in = x.clone().requires_grad_(True)
        (up(x_in).square().sum() + down(x_in).square().sum()).backward()
        x_ref = x.clone().requires_grad_(True)
        (F.interpolate(x_ref, scale_factor=2).square().sum() + F.avg_pool2d(x_ref, 2, 2).square().sum()).backward()
        assert torch.equal(x_in.grad, x_ref.grad)


def _random_params(module):
    with torch.no_grad():
        for p in module.parameters():  # the zero-initialised output conv too
            p.copy_(randn(*p.shape) * 0.3)
    return module


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("kind", ["plain", "up", "down", "wider"])
def test_resblock_in_place_forward_is_bit_identical(scale_shift, kind):
    block = _random_params(ResBlock(32, 16, 0.0, out_channels=64 if kind == "wider" else None,
                                   use_scale_shift_norm=scale_shift, up=kind == "up", down=kind == "down")).eval()
    x, emb = randn(3, 32, 8, 8), randn(3, 16)
    x0, emb0 = x.clone(), emb.clone()
    with torch.no_grad():
        fast = block(x, emb)
    assert torch.equal(x, x0) and torch.equal(emb, emb0)  # the inputs are never written
    with torch.enable_grad():
        plain = block(x, emb)  # the autograd path (the parameters require grad)
    assert plain.requires_grad and torch.equal(fast, plain)


def test_unet_sampling_forward_is_bit_identical_to_the_autograd_one():
    flags = dict(image_size=16, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                 attention_resolutions="4", num_head_channels=32, learn_sigma=True, class_cond=True, num_classes=11,
                 use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True)
    net = _random_params(create_model(**flags)).eval()
    x, t, y = randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 10, 7])
    with torch.no_grad():
        fast = net(x, t, y)
    x_in = x.clone().requires_grad_(True)
    plain = net(x_in, t, y)
    assert torch.equal(fast, plain.detach())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps the plain path
        fast_bf16 = net(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_bf16 = net(x_in, t, y)
    assert torch.equal(fast_bf16, plain_bf16.detach())
