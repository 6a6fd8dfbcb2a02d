"""Speed options for frozen networks at sampling time (issue 11): reduced-precision autocast, ``channels_last``
memory layout, the attention kernel and ``torch.compile``. Plain PyTorch; ``GuidedDiffusion`` and
``tools/bench.py`` use them.

* ``autocast``: ``"bf16"`` / ``"fp16"`` run the network's matmuls and convolutions in that dtype
  (``torch.autocast``); the output is cast back to float32 so that all sampler arithmetic stays float32.
  ``"auto"`` is bf16 where the hardware has fast bf16 (CPU: AMX-BF16 or AVX512-BF16 in /proc/cpuinfo; CUDA:
  ``torch.cuda.is_bf16_supported()``), else no autocast. Detected, never assumed.
* ``channels_last``: NHWC weights, so convolutions pick the NHWC kernels (oneDNN / cuDNN); numerics unchanged up
  to summation order. ``"auto"``: NHWC exactly for the networks that run under autocast (in float32 on the CPU
  NHWC makes GroupNorm 2-8x slower; under bf16 it is the fast layout).
* ``attention``: ``"matmul"`` (explicit softmax(q^T k / sqrt(c)) v, float32 softmax), ``"sdpa"``
  (``F.scaled_dot_product_attention``) or ``"auto"`` (SDPA off-CPU; on CPU SDPA for >= 1024 tokens, matmul below).
* ``compile``: ``torch.compile`` of the network's forward (the module itself is unchanged, so its state dict
  and attributes stay as they are). Guided sampling runs inside ``no_donated_buffers()`` (see there).
* ``quantize``: ``"int8"`` runs the diffusion UNet's convolutions as calibrated int8 oneDNN kernels on the CPU
  (``models/quantize.py``; calibration inputs from the sampler: ``module/quantize.py``); its other layers stay
  float32, so it excludes an explicit ``autocast`` (``"auto"`` gives way to it), and it runs eagerly (``compile``
  then compiles the classifier only).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from tailgen.utils import ConfigError

ATTENTION_MODES = {"auto": None, "matmul": False, "sdpa": True}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_CHOICES = (None, "auto", *AUTOCAST_DTYPES)
QUANTIZE_CHOICES = (None, "int8")
# the speed options of strict float32 (no autocast, float32 classifier, standard layout, eager, no int8): the
# reference every speed option is measured against (tools/bench.py, tools/quality_vs_fp32.py, the tests)
STRICT_FP32 = {"autocast": None, "autocast_classifier": False, "channels_last": False, "compile": False,
               "quantize": None}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def hardware_report() -> dict:
    """What the speed options depend on: the CPU's vector ISA and bf16/fp16 units, the GPU if any."""
    flags = cpu_flags()
    report = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
              "amx_fp16": "amx_fp16" in flags, "amx_int8": "amx_int8" in flags,
              "avx512_vnni": "avx512_vnni" in flags, "threads": torch.get_num_threads(),
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return report


def fast_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls/convolutions have hardware support on ``device``; the environment variable
    ``TAILGEN_FAST_BF16=0`` / ``1`` overrides the detection (the test suite sets 0: float32 on every machine)."""
    override = os.environ.get("TAILGEN_FAST_BF16")
    if override in ("0", "1"):
        return override == "1"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    return False


def resolve_autocast(autocast: Optional[str], device: torch.device | str) -> Optional[torch.dtype]:
    """The autocast dtype of the option value (None: float32)."""
    if autocast not in AUTOCAST_CHOICES:
        raise ConfigError(f"autocast must be one of null, auto, bf16, fp16; got {autocast!r}")
    if autocast == "auto":
        return torch.bfloat16 if fast_bf16(device) else None
    return AUTOCAST_DTYPES.get(autocast)


def check_quantize(quantize: Optional[str], calibration: int, autocast: Optional[str]) -> None:
    """ConfigError for a bad ``quantize`` value, a calibration size < 1 or int8 together with autocast."""
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be null or int8; got {quantize!r}")
    if quantize is not None and (isinstance(calibration, bool) or not isinstance(calibration, int)
                                 or calibration < 1):
        raise ConfigError(f"calibration must be a number of inputs >= 1; got {calibration!r}")
    if quantize is not None and autocast not in (None, "auto"):
        raise ConfigError(f"quantize: {quantize} and autocast: {autocast} exclude each other (the int8 UNet "
                          "keeps its other layers in float32): drop one of them")


def compiled_autocast(autocast: Optional[str], dtype: Optional[torch.dtype], compile: bool,
                      device: torch.device | str) -> Optional[torch.dtype]:
    """The autocast dtype of a network that is also compiled. On CPU, torch.compile (inductor, torch 2.14) of the
    64x64 ADM UNet under bf16 autocast returns non-finite values where eager bf16 is finite (the whole middle block
    compiled as one graph; each of its layers compiled alone is finite: ``python tools/compile_check.py``), so
    there ``auto`` gives way to float32 when ``compile`` is on and an explicit bf16 / fp16 is refused."""
    if not compile or dtype is None or torch.device(device).type != "cpu":
        return dtype
    if autocast == "auto":
        return None
    raise ConfigError(f"compile: true with autocast: {autocast} on CPU gives non-finite samples (an inductor bug "
                      "with CPU autocast, docs/bench/2026-12-01_s6_compile.md): use autocast: null (or auto) "
                      "with compile, or autocast without compile")


def check_channels_last(channels_last) -> None:
    """ConfigError unless ``channels_last`` is true, false or ``auto``."""
    if not (isinstance(channels_last, bool) or channels_last == "auto"):
        raise ConfigError(f"channels_last must be true, false or auto; got {channels_last!r}")


def wants_channels_last(channels_last, autocast: Optional[torch.dtype]) -> bool:
    """Whether a network called under ``autocast`` (None: float32) gets NHWC weights: ``auto`` = under autocast."""
    return autocast is not None if channels_last == "auto" else bool(channels_last)


def set_attention(net: nn.Module, mode: str) -> nn.Module:
    """Set every attention layer of ``net`` to the ``matmul`` / ``sdpa`` / ``auto`` form (in place)."""
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTION_MODES)}; got {mode!r}")
    for module in net.modules():
        if hasattr(module, "use_sdpa"):
            module.use_sdpa = ATTENTION_MODES[mode]
    return net


def prepare_network(net: nn.Module, *, channels_last: bool = False, attention: str = "auto") -> nn.Module:
    """Apply the in-place options (memory layout, attention kernel) to a frozen network."""
    set_attention(net, attention)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net


class AutocastCall:
    """``net(*args, **kwargs)`` under ``torch.autocast(dtype)`` with floating outputs cast back to float32.

    Other attributes (e.g. ``class_embedding``) are the wrapped network's, unchanged."""

    def __init__(self, net: Callable, dtype: Optional[torch.dtype]):
        self.net, self.dtype = net, dtype

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.dtype is None:
            return self.net(x, *args, **kwargs)
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.net(x, *args, **kwargs)
        return out.float() if out.is_floating_point() else out

    def __getattr__(self, name: str):
        if name == "net":
            raise AttributeError(name)
        return getattr(self.net, name)


def fast_network(net: nn.Module, *, autocast: Optional[torch.dtype] = None, compile: bool = False) -> Callable:
    """A callable running ``net`` with the call-time options (autocast dtype, torch.compile); ``net`` itself is
    not changed (``prepare_network`` does the in-place ones)."""
    call = torch.compile(net) if compile else net
    return AutocastCall(call, autocast) if autocast is not None else call


def no_donated_buffers() -> contextlib.AbstractContextManager:
    """The scope of a guided sampling run: AOT autograd's donated buffers off (torch.compile; no effect on eager
    networks, and torch < 2.6 has none).

    A compiled graph's backward may free or reuse ("donate") the activations its forward saved, which is only valid
    when each forward is differentiated once. Guided sampling differentiates one classifier forward once per
    objective (``ClassifierEval.grad``: log p(y), entropy, log(1 - p), ...; all but the last with
    ``retain_graph``), so no graph it runs may donate. The setting counts where a graph is compiled (at its first
    call for each new input shape, the batch size among them) and where its backward runs, hence one scope around
    the whole run. Without it a second batch size (dynamo then recompiles with a dynamic batch dimension, and AOT
    autograd compiles such a graph's backward at once, donating) failed at the first backward with "non-empty
    donated buffers" (a static graph's backward is compiled lazily, at its first backward, and one that sees
    retain_graph donates nothing).
    """
    config = torch._functorch.config
    return config.patch(donated_buffer=False) if hasattr(config, "donated_buffer") else contextlib.nullcontext()


def time_first_call(fn: Callable[[], object]) -> float:
    """Seconds of one call (e.g. the first call of a compiled network, which compiles it)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class NetworkClock:
    """The wall time a sampling run spends inside its networks, measured in that same run (issue 11's framework
    overhead = run time / network time, free of the machine's drift between separate runs).

    ``wrap(fn)`` times every call of a network callable (attributes still reach ``fn``); within ``backward()``
    every ``torch.autograd.grad`` (the classifier's backward, and any backward through the UNet) is timed too.
    Nested timed calls count once. ``sync`` (e.g. ``torch.cuda.synchronize``) runs around each timed call.
    """

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.seconds, self.calls, self._depth, self._sync = 0.0, 0, 0, sync

    def _time(self, fn: Callable, *args, **kwargs):
        if self._depth:
            return fn(*args, **kwargs)
        self._sync()
        start, self._depth = time.perf_counter(), 1
        try:
            return fn(*args, **kwargs)
        finally:
            self._sync()
            self.seconds += time.perf_counter() - start
            self.calls, self._depth = self.calls + 1, 0

    def wrap(self, fn: Callable) -> Callable:
        return _TimedCall(self, fn)

    @contextlib.contextmanager
    def backward(self):
        grad = torch.autograd.grad
        torch.autograd.grad = functools.partial(self._time, grad)
        try:
            yield self
        finally:
            torch.autograd.grad = grad


class _TimedCall:
    """``fn`` timed by a ``NetworkClock``; other attributes are ``fn``'s."""

    def __init__(self, clock: NetworkClock, fn: Callable):
        self.clock, self.fn = clock, fn

    def __call__(self, *args, **kwargs):
        return self.clock._time(self.fn, *args, **kwargs)

    def __getattr__(self, name: str):
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)
