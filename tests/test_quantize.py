"""quantize: int8 (models/quantize.py, module/quantize.py): PTQ4DM calibration, int8 oneDNN convolutions, errors.

Stated tolerances (measured here, docs/architecture.md, README "Speed options"), eps = the UNet's noise output:
* Int8Conv equals its own integer arithmetic (dequantised input and weight through a float conv) to 1e-4 of the
  output scale: the oneDNN kernel, zero point, padding, stride and the Conv1d mapping are exact.
* tiny random ADM UNet, random inputs at t in {0, 250, 500, 750, 999}: relative RMS error of eps <= 8 % (measured
  5.0-5.4 %; random weights give wide, unstructured activations).
* Fashion preset (fashion_diffusion, 16 calibration inputs), inputs recorded along float32 DDPM-10 trajectories at
  every step: relative RMS error of eps <= 3 % over all steps (measured 1.1-1.2 %; bf16 autocast on the same
  inputs: 1.1-1.2 %), <= 2.5 % at each step t > 0 (measured 0.6-1.2 %) and <= 8 % at t = 0 (measured 2.7-3.3 %;
  eps is barely determined there and moves x0_hat by < 0.1 %).
Samples are not compared pixel by pixel: at t = 999 an eps error is amplified by 1 / sqrt(abar) in x0_hat (first
step, mean abs: int8 0.20, bf16 0.06) and some DDPM-10 trajectories then end at another image (final mean abs
difference over 8 Fashion samples: int8 0.10-0.11, bf16 0.008). Quality is measured by tools/quality_vs_fp32.py
(FID / precision / recall / class accuracy, setting int8).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from tailgen.models import quantize as q
from tailgen.models.spec import NetworkSpec
from tailgen.module import quantize as mq
from tailgen.module.guided import GuidedDiffusion
from tailgen.utils import ConfigError

pytestmark = pytest.mark.skipif(q.int8_available() is not None, reason=f"no int8 kernels: {q.int8_available()}")

ROOT = Path(__file__).resolve().parents[1]
UNET = dict(image_size=16, in_channels=3, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="8", num_head_channels=16, learn_sigma=True, class_cond=True, num_classes=10,
            use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True, diffusion_steps=1000,
            noise_schedule="cosine")


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    net = NetworkSpec(flags=UNET, random_init=True).build()
    generator = torch.Generator().manual_seed(1)
    for _, param in sorted(net.named_parameters()):  # fill the zero-initialised output layers
        if not param.any():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return net


def random_batches(count: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g),
             {"y": torch.randint(0, 10, (batch,), generator=g)}) for _ in range(count)]


@pytest.mark.parametrize("conv", [nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(16, 8, 3, stride=2, padding=1),
                                  nn.Conv2d(16, 8, 1), nn.Conv1d(16, 24, 1)])
def test_int8_conv_is_its_integer_arithmetic(conv):
    torch.manual_seed(0)
    x = torch.rand(3, 16, *([9, 9] if isinstance(conv, nn.Conv2d) else [20])) * 4 - 0.5
    layer = q.Int8Conv(conv, lo=-0.5, hi=3.0)  # inputs above 3 are clipped, like any calibrated range
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == conv(x).shape
    assert layer.q_weight.dtype == torch.int8 and layer.x_zero_point > 0
    x_deq = (q.quantize_u8(x, layer.x_scale, layer.x_zero_point).float() - layer.x_zero_point) * layer.x_scale
    w_deq = layer.q_weight.float() * layer.w_scale[:, None, None, None]
    if isinstance(conv, nn.Conv1d):
        w_deq = w_deq[..., 0]
    ref = conv._conv_forward(x_deq, w_deq.reshape(conv.weight.shape), conv.bias)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert 0 < rel_rms(out, conv(x).detach()) < 0.1  # int8 really ran (and the clipped tail is small)


def test_quantize_u8_fused_equals_plain_ops(monkeypatch):
    x = torch.randn(2, 8, 5, 5) * 3
    fused = q.quantize_u8(x, 0.02, 100)
    monkeypatch.delattr(torch, "quantize_per_tensor")
    plain = q.quantize_u8(x, 0.02, 100)
    assert fused.dtype == plain.dtype == torch.uint8
    assert (fused.int() - plain.int()).abs().max().item() <= 1  # rounding of exact halves may differ


def test_tiny_unet_int8_within_tolerance():
    net = tiny_unet()
    keys, params = set(net.state_dict()), {k: v.clone() for k, v in net.state_dict().items()}
    quantized = q.quantize_unet(net, random_batches(4, 8, seed=0))
    convs = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert q.int8_layers(quantized) == [n for n in convs if n not in {convs[0], convs[-1]}]
    assert not any(isinstance(m, q.Int8Conv) for m in net.modules())  # the float network is unchanged
    assert set(net.state_dict()) == keys and all(torch.equal(v, params[k]) for k, v in net.state_dict().items())
    assert not any(m._forward_pre_hooks for m in net.modules())  # calibration hooks removed
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.arange(4)
    with torch.no_grad():
        for t in (0, 250, 500, 750, 999):
            ref, out = net(x, torch.full((4,), t), y=y), quantized(x, torch.full((4,), t), y=y)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            assert 0 < rel_rms(out[:, :3], ref[:, :3]) <= 0.08, t


def test_ndtc_steps_follow_ptq4dm():
    steps = mq.ndtc_steps(20000, 51, generator=torch.Generator().manual_seed(0))
    assert steps.min() == 0 and steps.max() == 50
    share = lambda k: (steps == k).float().mean().item()  # noqa: E731
    assert abs(share(0) - 0.1648) < 0.01  # P(u < 0.01) = Phi((0.01 - mean) / std) = Phi(-0.975) (clipped + rounded)
    assert abs(share(50) - 0.0701) < 0.01  # P(u > 0.99) = Phi(-1.475)
    assert abs(steps.float().median().item() - 20) <= 1  # 0.4 * 50
    assert torch.equal(steps, mq.ndtc_steps(20000, 51, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def fashion():
    def build(**options):
        return GuidedDiffusion(NetworkSpec(preset="fashion_diffusion"), diffusion={"timestep_respacing": "10"},
                               progress=False, **options)
    return build(), build(quantize="int8", calibration=16)


def test_calibration_records_the_drawn_inputs(fashion):
    fp32, _ = fashion
    batches = mq.collect_calibration(fp32, 24, per_trajectory=8)  # 3 trajectories
    t = torch.cat([b[1] for b in batches])
    steps = mq.ndtc_steps(24, 10, generator=torch.Generator().manual_seed(mq.CALIBRATION_SEED))
    expected = sorted(fp32.process.model_timesteps(int(i), 1, "cpu").item() for i in steps)
    assert sorted(t.tolist()) == expected  # every draw once, duplicates kept
    assert all(set(b[2]) == {"y"} and b[0].shape[1:] == (1, 28, 28) for b in batches)
    assert fp32._fast == {} and fp32.progress is False and fp32.compile_networks is False  # state restored


def test_fashion_preset_int8_within_tolerance(fashion):
    fp32, int8 = fashion
    keys = set(int8.state_dict())
    labels, seeds = torch.arange(4), torch.arange(4)
    images = int8.sample(labels, seeds)  # calibrates at the first batch
    assert images.shape == (4, 1, 28, 28) and torch.isfinite(images).all()
    quantized = int8._fast[("network", "cpu")]
    assert len(q.int8_layers(quantized)) == 45 and set(int8.state_dict()) == keys
    assert not any(isinstance(m, q.Int8Conv) for m in int8.modules())  # not a submodule: checkpoints unchanged
    # inputs along float32 trajectories, every step
    wanted = {fp32.process.model_timesteps(i, 1, "cpu").item(): [0, 1, 2, 3] for i in range(10)}
    recorder = mq.Recorder(fp32.net, wanted, 4)
    with fp32.sampling_with(recorder):
        fp32.sample(labels, seeds + 100)
    x, t, kw = mq.batches_of(recorder.records, 40)[0]
    with torch.no_grad():
        ref, out = fp32.net(x, t, **kw)[:, :1], quantized(x, t, **kw)[:, :1]
    assert len(x) == 40 and rel_rms(out, ref) <= 0.03
    for value in t.unique():
        assert rel_rms(out[t == value], ref[t == value]) <= (0.08 if value == 0 else 0.025), value


def test_sampling_with_calls_the_given_network_eagerly_and_restores_the_module():
    module = GuidedDiffusion(NetworkSpec(flags=UNET, random_init=True), diffusion={"timestep_respacing": "2"},
                             check_samples=False, compile=True, autocast="bf16")
    hook, calls = lambda info: None, []
    module.step_hook, cache = hook, module._fast

    def network(x, t, **kwargs):
        calls.append(len(x))
        return module.net(x, t, **kwargs)

    with pytest.raises(RuntimeError, match="inside"), module.sampling_with(network):
        assert (module.compile_networks, module.autocast, module.progress, module.step_hook) == (False, None, False, None)
        out = module.sample(torch.tensor([1, 2, 3]), torch.arange(3))
        assert out.dtype == torch.float32 and calls == [3, 3]  # the given network at both steps, nothing compiled
        raise RuntimeError("inside")
    assert (module.compile_networks, module.autocast, module.progress, module.step_hook) == (True, "bf16", True, hook)
    assert module._fast is cache and cache == {}


def test_bad_values_and_devices():
    spec = NetworkSpec(flags=UNET, random_init=True)
    with pytest.raises(ConfigError, match="quantize must be null or int8"):
        GuidedDiffusion(spec, quantize="int4")
    with pytest.raises(ConfigError, match="exclude each other"):
        GuidedDiffusion(spec, quantize="int8", autocast="bf16")
    with pytest.raises(ConfigError, match="calibration must be a number of inputs >= 1"):
        GuidedDiffusion(spec, quantize="int8", calibration=0)
    module = GuidedDiffusion(spec, quantize="int8", diffusion={"timestep_respacing": "2"}, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GuidedDiffusion, "device", property(lambda self: torch.device("cuda", 0)))
        with pytest.raises(ConfigError, match=r"int8 runs on the CPU only .* this run is on cuda:0"):
            mq.int8_network(module)
    upsampler = GuidedDiffusion(NetworkSpec("fashion_upsampler", random_init=True), quantize="int8", progress=False)
    with pytest.raises(ConfigError, match="an upsampler needs low_res images"):
        mq.int8_network(upsampler)
    layer = q.Int8Conv(nn.Conv2d(2, 2, 1), -1.0, 1.0)
    with pytest.raises(ConfigError, match="CPU only; got an input on meta"):
        layer(torch.zeros(1, 2, 2, 2, device="meta"))
    with pytest.raises(ConfigError, match="no calibration inputs"):
        q.quantize_unet(tiny_unet(), [])
    with pytest.raises(ConfigError, match="cannot quantise"):
        q.Int8Conv(nn.Conv2d(2, 2, 3, padding="same"), -1.0, 1.0)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tools_take_the_option():
    bench = load_tool("bench")
    args = bench.parse_args(["--quantize", "int8", "--calibration", "32", "--cases", "fashion", "--device", "cpu"])
    module = bench.build_module("fashion", 2, True, args.presets["custom"], args.device)
    assert (module.quantize, module.calibration, module.compile_networks) == ("int8", 32, False)
    quality = load_tool("quality_vs_fp32")
    module = quality.build(quality.SETTINGS["int8"], 2, False, "cpu", calibration=32)
    assert (module.quantize, module.calibration) == ("int8", 32)
