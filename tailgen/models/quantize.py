"""Post-training int8 quantisation of a diffusion UNet for the CPU (issue 11; calibration set as in PTQ4DM,
Shang et al., CVPR 2023). Plain PyTorch; the calibration inputs come from ``tailgen.module.quantize``.

What is quantised (W8A8 at every convolution's input, static ranges):

* weights: int8, symmetric, per output channel: ``s_w[c] = max |W[c]| / 127``, ``W_q = clamp(round(W / s_w), ±127)``;
* the activation entering each convolution: uint8, asymmetric, one range per layer for the whole run (all
  timesteps): ``q(x) = clamp(round(x / s_x) + z, 0, 255)``, ``s_x = (hi - lo) / 255``, ``z = round(-lo / s_x)``;
* the convolution runs as oneDNN's u8 x s8 -> s32 kernel and is dequantised inside it to float32:
  ``y = s_x s_w[c] sum (q(x) - z) W_q[c] + b[c]`` (AMX-INT8 / AVX512-VNNI where the CPU has them).

Everything else stays float32: GroupNorm, SiLU, the attention matmuls and softmax, residual adds, the time /
class embedding MLPs (Linear layers on B x D vectors: 0.1 % of the Fashion UNet's MACs, and they modulate every
block), and by default the first and the last convolution (x_t enters and eps leaves through them; 0.3 % of the
MACs).

Activation ranges (``lo``, ``hi``) are chosen on the calibration inputs by the range search of PTQ4DM's code base
(its "mse" initialisation): ``[a lo_min, a hi_max]`` for ``a`` in 1.00, 0.99, ..., 0.20, keeping the ``a`` whose
fake-quantised values have the least squared error on a seeded subsample of the layer's inputs (the extremes
included). PTQ4DM's BRECQ / AdaRound weight reconstruction is not done: with int8 weights alone (float
activations) the Fashion UNet's eps moves by 0.4 % (relative RMS); the uint8 activations cause the rest.

Kernel path, torch 2.14 CPU: ``torch.ops.onednn.qconv_prepack`` / ``qconv_pointwise``, the int8 convolution that
torch.compile emits for PT2E-quantised graphs (torchao's ``X86InductorQuantizer``), called directly: no torchao
dependency and no inductor compile (minutes per network on this machine), plain uint8 / int8 tensors in and
float32 out. ``int8_available()`` probes it once.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import nn

from tailgen.utils import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor, dict]  # (x_t, timesteps, network kwargs such as y / class_emb)
RANGE_STEPS = torch.linspace(1.0, 0.2, 81)  # a: candidate shrink factors of the observed range
SUBSAMPLE = 4096  # activation values kept per layer and calibration batch for the range search
# quantize_u8 uses torch.quantize_per_tensor only for its fused rounding kernel (the result is a plain uint8 tensor)
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other "
                        r"quantized tensor creation functions", category=UserWarning)


@functools.lru_cache(maxsize=None)
def int8_available() -> Optional[str]:
    """None where oneDNN's int8 convolution runs on this CPU, else why not (one line)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    try:
        conv = nn.Conv2d(2, 2, 1)
        Int8Conv(conv, lo=-1.0, hi=1.0)(torch.zeros(1, 2, 2, 2))
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        return f"oneDNN int8 convolution unavailable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return None


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 scale and zero point of the range [lo, hi] (widened to contain 0, so that 0 is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(min(max(round(-lo / scale), 0), 255))


def quantize_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, 0, 255) as uint8, same shape and memory format as ``x``.

    One fused pass (``torch.quantize_per_tensor``, then its uint8 values) where torch still has the quantised
    dtypes; the same values from plain tensor ops otherwise."""
    if hasattr(torch, "quantize_per_tensor"):
        return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).int_repr()
    return (x / scale).round_().add_(zero_point).clamp_(0, 255).to(torch.uint8)


class Int8Conv(nn.Module):
    """A Conv1d / Conv2d (zero padding) as an int8 oneDNN convolution with float32 output (see the module doc).

    ``lo`` / ``hi``: the calibrated input range. Buffers: ``q_weight`` (int8), ``w_scale`` (per output channel),
    ``bias``; the packed oneDNN weight is made at the first call and not saved. Conv1d runs as a (k x 1) Conv2d.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, lo: float, hi: float):
        super().__init__()
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or conv.padding_mode != "zeros" or \
                isinstance(conv.padding, str):
            raise ConfigError(f"int8: cannot quantise {conv!r} (Conv1d / Conv2d with integer zero padding only)")
        self.dims = conv.weight.dim() - 2
        weight = conv.weight.detach().float()
        weight = weight if self.dims == 2 else weight.unsqueeze(-1)
        w_scale = weight.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / 127.0
        self.register_buffer("q_weight", torch.round(weight / w_scale[:, None, None, None]).clamp_(-127, 127)
                             .to(torch.int8))
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("w_zero_point", torch.zeros(len(w_scale), dtype=torch.int64))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float())
        if self.dims == 2:
            self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        else:  # (k) -> (k x 1)
            self.stride, self.padding, self.dilation = [conv.stride[0], 1], [conv.padding[0], 0], [conv.dilation[0], 1]
        self.groups, self.in_channels, self.out_channels = conv.groups, conv.in_channels, conv.out_channels
        self.lo, self.hi = float(lo), float(hi)
        self.x_scale, self.x_zero_point = activation_qparams(lo, hi)
        self._packed: Optional[torch.Tensor] = None

    def packed_weight(self) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.onednn.qconv_prepack(
                self.q_weight, self.w_scale, self.x_scale, self.x_zero_point, self.stride, self.padding,
                self.dilation, self.groups, None)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ConfigError(f"int8 convolutions run on the CPU only; got an input on {x.device}")
        x4 = x if self.dims == 2 else x.unsqueeze(-1)
        y = torch.ops.onednn.qconv_pointwise(
            quantize_u8(x4.float(), self.x_scale, self.x_zero_point), self.x_scale, self.x_zero_point,
            self.packed_weight(), self.w_scale, self.w_zero_point, self.bias, self.stride, self.padding,
            self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "")
        return y if self.dims == 2 else y.squeeze(-1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, dims={self.dims}, stride={self.stride}, "
                f"padding={self.padding}, input range=[{self.lo:.4g}, {self.hi:.4g}]")


class RangeObserver:
    """Per-layer input statistics over the calibration batches: exact min / max and a seeded value subsample."""

    def __init__(self, seed: int = 0):
        self.lo, self.hi, self.values = float("inf"), float("-inf"), []
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1)
        self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())
        if x.numel() > SUBSAMPLE:
            x = x[torch.randint(x.numel(), (SUBSAMPLE,), generator=self.generator)]
        self.values.append(x.cpu())

    def best_range(self) -> tuple[float, float]:
        """The shrunk range [a lo, a hi] with the least squared fake-quantisation error on the subsample."""
        values = torch.cat([*self.values, torch.tensor([self.lo, self.hi])])
        errors = []
        for a in RANGE_STEPS.tolist():
            scale, zero = activation_qparams(a * self.lo, a * self.hi)
            fake = (quantize_u8(values, scale, zero).float() - zero) * scale
            errors.append((fake - values).pow(2).mean().item())
        a = RANGE_STEPS[int(torch.tensor(errors).argmin())].item()
        return a * self.lo, a * self.hi


def default_float_layers(net: nn.Module) -> set[str]:
    """Names of the first and the last convolution of ``net`` (module order): kept in float32."""
    convs = [name for name, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    return {convs[0], convs[-1]} if convs else set()


def _replace(module: nn.Module, replacements: dict[str, nn.Module], prefix: str = "") -> nn.Module:
    """A shallow copy of the module tree with the named submodules replaced; parameters are shared, not copied."""
    if prefix in replacements:
        return replacements[prefix]
    new = copy.copy(module)
    for key, value in list(vars(new).items()):  # own dicts (parameters, buffers, hooks): later changes stay apart
        if isinstance(value, dict):
            setattr(new, key, type(value)(value))
    new._modules = {name: (None if child is None else
                           _replace(child, replacements, f"{prefix}.{name}" if prefix else name))
                    for name, child in module._modules.items()}
    return new


@torch.no_grad()
def quantize_unet(net: nn.Module, calibration_batches: Iterable[Batch], *,
                  keep_float: Optional[Sequence[str]] = None) -> nn.Module:
    """An int8 copy of ``net`` (CPU): every Conv1d / Conv2d but ``keep_float`` (default: the first and the last
    convolution) becomes an ``Int8Conv`` with ranges calibrated on ``net(x, t, **kwargs)`` for the batches
    ``(x, t, kwargs)``. ``net`` is not changed; the copy shares its float parameters (new memory: the int8
    weights only) and is in eval mode."""
    reason = int8_available()
    if reason is not None:
        raise ConfigError(f"quantize: int8 is not available here: {reason}")
    if any(p.device.type != "cpu" for p in net.parameters()):
        raise ConfigError("quantize: int8 runs on the CPU only: move the network to the CPU first")
    keep = default_float_layers(net) if keep_float is None else set(keep_float)
    targets = {name: m for name, m in net.named_modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d)) and name not in keep}
    if not targets:
        raise ConfigError("quantize: the network has no convolution to quantise")
    observers = {name: RangeObserver(seed=k) for k, name in enumerate(sorted(targets))}
    hooks = [m.register_forward_pre_hook(observers[name]) for name, m in targets.items()]
    was_training, seen = net.training, 0
    net.eval()
    try:
        for x, t, kwargs in calibration_batches:
            net(x, t, **kwargs)
            seen += len(x)
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    if not seen:
        raise ConfigError("quantize: no calibration inputs (calibration must be >= 1)")
    replacements = {name: Int8Conv(m, *observers[name].best_range()) for name, m in targets.items()}
    return _replace(net, replacements).eval()


def int8_layers(net: nn.Module) -> list[str]:
    """Names of the int8 convolutions of a quantised network."""
    return [name for name, m in net.named_modules() if isinstance(m, Int8Conv)]
