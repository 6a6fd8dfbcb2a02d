"""Speed options of GuidedDiffusion (models/speed.py) against float32, tiny random networks, fixed seeds.

Stated tolerances (docs/architecture.md, README "Speed options"):
* channels_last, attention=sdpa/matmul, compile: max abs error <= 1e-4 on eps, x0_hat, the classifier gradient
  (one step) and the final samples (4 guided DDPM steps) - same math, other kernels / summation order.
* autocast fp16: eps, x0_hat max abs error <= 1 % of their max magnitude; samples: max abs <= 0.05.
* autocast bf16 (8-bit mantissa): eps, x0_hat <= 4 % of their max magnitude; the classifier gradient is exactly
  the float32 one unless autocast_classifier (then <= 5 %); samples: mean abs error <= 0.03. Their max abs error
  is not bounded: x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies the eps error by up to ~1/sqrt(abar)
  at the noisiest steps and clipping to [-1, 1] then flips single pixels. What that does to the sample quality
  is measured with FID / precision / recall / class accuracy by tools/quality_vs_fp32.py.
"""

import os

import pytest
import torch

from tailgen.guidance import ClassifierGuidance, LowDensityGuidance
from tailgen.guidance.base import ClassifierEval
from tailgen.models import speed
from tailgen.models.spec import NetworkSpec
from tailgen.module.guided import GuidedDiffusion
from tailgen.utils import ConfigError

UNET = dict(image_size=16, in_channels=3, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="8", num_head_channels=16, learn_sigma=True, class_cond=True, num_classes=10,
            use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True, diffusion_steps=1000,
            noise_schedule="cosine")
CLF = dict(image_size=16, in_channels=3, num_classes=10, classifier_width=32, classifier_depth=1,
           classifier_attention_resolutions="8", classifier_channel_mult="1,2")


def build(guidances=None, defaults=False, **options) -> GuidedDiffusion:
    """The same tiny guided model for every option: seeded init, zero-initialised layers filled (seeded). Options
    not given are strict float32 (the reference of this file), or with ``defaults`` GuidedDiffusion's own."""
    options = options if defaults else {**speed.STRICT_FP32, **options}
    torch.manual_seed(0)
    module = GuidedDiffusion(
        NetworkSpec(flags=UNET, random_init=True), NetworkSpec(kind="classifier", flags=CLF, random_init=True),
        diffusion={"timestep_respacing": "4"}, guidances=guidances or {"classifier": ClassifierGuidance(scale=2.0)},
        progress=False, check_samples=False, **options)
    generator = torch.Generator().manual_seed(1)
    for _, param in sorted(module.named_parameters()):
        if not param.any():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return module


def measure(module: GuidedDiffusion) -> dict:
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels, i = torch.arange(4), 2
    with torch.no_grad():
        pred = module._denoiser()(x, i, labels)
    grad = ClassifierEval(module._noisy_classifier(), x, i, labels).grad_log_p_y
    return {"eps": pred.eps, "x0": module.process.x0_from_eps(x, i, pred.eps), "log_var": pred.log_var,
            "grad": grad, "sample": module.sample(labels, torch.arange(4))}


@pytest.fixture(scope="module")
def fp32():
    return measure(build())


def errors(out: dict, ref: dict) -> dict:
    for name, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
    return {name: (out[name] - ref[name]).abs().max().item() for name in out}


@pytest.mark.parametrize("options", [dict(channels_last=True), dict(attention="sdpa"), dict(attention="matmul"),
                                     dict(channels_last=True, attention="sdpa")])
def test_exact_options_match_fp32(options, fp32):
    module = build(**options)
    if options.get("channels_last"):
        conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    if "attention" in options:
        flags = {m.use_sdpa for m in module.modules() if hasattr(m, "use_sdpa")}
        assert flags == {options["attention"] == "sdpa"}
    assert max(errors(measure(module), fp32).values()) <= 1e-4


@pytest.mark.parametrize("dtype,rel", [("bf16", 0.04), ("fp16", 0.01)])
def test_autocast_within_tolerance(dtype, rel, fp32):
    out = measure(build(autocast=dtype))
    err = errors(out, fp32)
    assert err["eps"] > 0  # the networks really ran in reduced precision
    for name in ("eps", "x0"):
        assert err[name] <= rel * fp32[name].abs().max().item(), (name, err[name])
    assert err["grad"] == 0  # the classifier stays float32 unless autocast_classifier
    sample_mean = (out["sample"] - fp32["sample"]).abs().mean().item()
    assert sample_mean <= (0.03 if dtype == "bf16" else 0.005)
    if dtype == "fp16":
        assert err["sample"] <= 0.05


def test_autocast_classifier_gradient(fp32):
    err = errors(measure(build(autocast="bf16", autocast_classifier=True)), fp32)
    assert 0 < err["grad"] <= 0.05 * fp32["grad"].abs().max().item()


@pytest.mark.real_hardware
def test_autocast_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"avx2"}))
    assert speed.resolve_autocast("auto", "cpu") is None
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert speed.resolve_autocast("auto", "cpu") is torch.bfloat16
    assert speed.resolve_autocast(None, "cpu") is None
    monkeypatch.setenv("TAILGEN_FAST_BF16", "0")  # the override beats the detection, both ways
    assert speed.resolve_autocast("auto", "cpu") is None
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setenv("TAILGEN_FAST_BF16", "1")
    assert speed.resolve_autocast("auto", "cpu") is torch.bfloat16


@pytest.mark.real_hardware
@pytest.mark.parametrize("fast", [False, True])
def test_defaults_are_bf16_with_channels_last_only_on_fast_bf16_hardware(monkeypatch, fast):
    """The defaults (autocast auto, autocast_classifier, channels_last auto): bf16 UNet and classifier in NHWC where
    bf16 is fast, the strict float32 path (standard layout) elsewhere."""
    monkeypatch.setattr(speed, "fast_bf16", lambda device: fast)
    module, fp32 = build(defaults=True), build()
    for role, net in (("network", module.net), ("classifier", module.classifier_net)):
        call = module._fast_call(role, net)
        assert isinstance(call, speed.AutocastCall) == fast
        weight = next(p for p in net.parameters() if p.dim() == 4)
        assert weight.is_contiguous(memory_format=torch.channels_last) == fast and weight.is_contiguous() != fast
    labels = torch.tensor([0, 1])
    out, ref = module.sample(labels, seeds=torch.tensor([0, 1])), fp32.sample(labels, seeds=torch.tensor([0, 1]))
    assert torch.equal(out, ref) != fast and (out - ref).abs().mean() <= 0.03


def test_int8_takes_precedence_over_autocast_auto_but_not_over_bf16():
    build(defaults=True, quantize="int8")  # autocast auto gives way
    with pytest.raises(ConfigError, match="exclude each other"):
        build(quantize="int8", autocast="bf16")


def test_bad_option_values_are_config_errors():
    with pytest.raises(ConfigError, match="autocast must be one of"):
        build(autocast="int8")
    with pytest.raises(ConfigError, match="attention must be one of"):
        build(attention="flash")
    with pytest.raises(ConfigError, match="channels_last must be true, false or auto"):
        build(channels_last="nhwc")


def test_compile_plumbing_eager_backend(monkeypatch, fp32):
    """compile=True goes through torch.compile (dynamo + AOT autograd here, fast); state dict unchanged."""
    calls, compile_ = [], torch.compile

    def compile_eager(net, **kwargs):
        calls.append(net)
        return compile_(net, backend="aot_eager")

    monkeypatch.setattr(speed.torch, "compile", compile_eager)
    module = build(compile=True)
    keys = set(module.state_dict())
    assert max(errors(measure(module), fp32).values()) <= 1e-4
    assert {id(n) for n in calls} == {id(module.net), id(module.classifier_net)}
    assert set(module.state_dict()) == keys


INDUCTOR = pytest.mark.skipif(os.environ.get("TAILGEN_TEST_INDUCTOR") != "1",
                              reason="inductor compile takes minutes on 2 cores: TAILGEN_TEST_INDUCTOR=1 to run")


@pytest.mark.slow
@INDUCTOR
def test_compile_inductor(fp32):
    assert max(errors(measure(build(compile=True)), fp32).values()) <= 1e-4


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, INDUCTOR])])
def test_compile_takes_a_second_batch_size_with_classifier_gradients(monkeypatch, backend):
    """Regression: compile=True with ClassifierGuidance failed at the first batch of another size ("non-empty
    donated buffers"): dynamo recompiles with a dynamic batch, whose backward AOT autograd compiles with donated
    buffers, which ClassifierEval's retain_graph backwards forbid (models/speed.py ``no_donated_buffers``). Two
    objectives on one classifier forward (log p(y), entropy), samples as eager's at both batch sizes."""
    compile_ = torch.compile
    monkeypatch.setattr(speed.torch, "compile", lambda net, **kwargs: compile_(net, backend=backend, **kwargs))
    guidances = {"cg": ClassifierGuidance(scale=2.0), "tail": LowDensityGuidance(variant="entropy", scale=1.0)}
    eager, compiled = build(guidances), build(guidances, compile=True)
    for n in (4, 3):
        labels, seeds = torch.arange(n), torch.arange(n) + 10
        torch.testing.assert_close(compiled.sample(labels, seeds), eager.sample(labels, seeds), atol=1e-4, rtol=0)


def test_network_clock_times_calls_and_backward_once():
    clock, net = speed.NetworkClock(), torch.nn.Linear(3, 1)
    timed = clock.wrap(net)
    assert timed.weight is net.weight  # attributes reach the wrapped callable
    x = torch.randn(4, 3, requires_grad=True)
    grad = torch.autograd.grad
    with clock.backward():
        assert torch.autograd.grad is not grad
        (g,) = torch.autograd.grad(timed(x).sum(), x)
    assert torch.autograd.grad is grad  # restored
    torch.testing.assert_close(g, net.weight.expand(4, 3))
    assert clock.calls == 2 and clock.seconds > 0
    nested = clock.wrap(lambda: timed(x))  # a timed call inside a timed call counts once
    nested()
    assert clock.calls == 3
    before = clock.seconds
    torch.autograd.grad(net(x).sum(), x)  # outside backward(): not timed
    assert clock.calls == 3 and clock.seconds == before


def test_compile_on_cpu_runs_float32(monkeypatch):
    """torch.compile x CPU autocast gave non-finite outputs (models/speed.compiled_autocast): under compile `auto`
    gives way to float32 and an explicit bf16 is refused with one clear error, before any sample is made."""
    compile_ = torch.compile
    monkeypatch.setattr(speed.torch, "compile", lambda net, **kwargs: compile_(net, backend="aot_eager"))
    monkeypatch.setenv("TAILGEN_FAST_BF16", "1")
    module = build(compile=True, autocast="auto", autocast_classifier=True)
    assert isinstance(build(autocast="auto")._fast_call("network", module.net), speed.AutocastCall)  # eager: bf16
    assert not isinstance(module._fast_call("network", module.net), speed.AutocastCall)
    assert not isinstance(module._fast_call("classifier", module.classifier_net), speed.AutocastCall)
    assert speed.compiled_autocast("auto", torch.bfloat16, False, "cpu") is torch.bfloat16  # eager keeps bf16
    assert speed.compiled_autocast("bf16", torch.bfloat16, True, "cuda") is torch.bfloat16  # only CPU gives way
    with pytest.raises(ConfigError, match="compile: true with autocast: bf16 on CPU"):
        build(compile=True, autocast="bf16").sample(torch.arange(2), torch.arange(2))
