"""Feature extractors: one interface for every metric.

``extractor(images_uint8_nchw) -> {"pool": (N, D), "logits": (N, C)?, "spatial": (N, D')?}`` (float32).

* `ClassifierFeatures` (here): penultimate features + logits of any classifier network (the domain
  extractor; Fashion-MNIST uses a clean ADM ``EncoderUNetModel`` with ``in_channels=1``).
* `InceptionFeatures` (`tailgen.metrics.inception`, re-exported here): torch-fidelity's FID Inception-v3
  (pool3 2048-d, 1008 unbiased logits, ADM's sFID spatial features).

Every extractor exposes ``identity`` (a string naming the network and its weights' digest); reference
feature caches are keyed by it, so a different network or checkpoint never reuses stale features.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tailgen.utils import ConfigError, DataError
from tailgen.utils.io import module_digest

__all__ = ["FeatureExtractor", "ClassifierFeatures", "InceptionFeatures", "to_uint8_nchw"]


def to_uint8_nchw(images, layout: str = "NCHW") -> torch.Tensor:
    """Return ``images`` (numpy array or tensor, uint8) as a uint8 NCHW tensor.

    ``layout="NHWC"`` converts the samples layout (``samples.npz: arr_0`` is NHWC) to NCHW; a 3-D array is
    taken as a batch of grey images (N, H, W).
    """
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if x.dtype != torch.uint8:
        raise DataError(f"images must be uint8 in [0, 255], got {x.dtype}; convert with "
                        "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for [-1, 1] floats")
    if x.dim() == 3:
        return x[:, None]
    if x.dim() != 4:
        raise DataError(f"images must be 4-D ({layout}), got shape {tuple(x.shape)}")
    layout = layout.upper()
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2).contiguous()
    if layout != "NCHW":
        raise ConfigError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return x


class FeatureExtractor(nn.Module):
    """Base class: frozen network, uint8 NCHW in, dict of float32 features out (chunked by ``batch_size``).

    Subclasses implement ``_extract(x_uint8_on_device) -> dict`` and ``_identity() -> str``; ``provides``
    lists the keys they return. Inputs move to the extractor's device; outputs come back on it.
    """

    provides: tuple[str, ...] = ("pool",)

    def __init__(self, batch_size: int = 64):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self._identity_cache: str | None = None
        self.training = False

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def identity(self) -> str:
        """Stable string naming network + weights (cache key component)."""
        if self._identity_cache is None:
            self._identity_cache = self._identity()
        return self._identity_cache

    def _identity(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True):
        """Always stays in eval mode (BatchNorm statistics and dropout are part of the metric)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = to_uint8_nchw(images)
        if x.shape[0] == 0:
            raise DataError("empty image batch")
        out: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for chunk in x.split(self.batch_size):
                for key, value in self._extract(chunk.to(self.device)).items():
                    out.setdefault(key, []).append(value.float().flatten(1))
        return {k: torch.cat(v) for k, v in out.items()}


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features (``pool``) and ``logits`` of a classifier, at diffusion timestep ``timestep``.

    Input conversion: uint8 -> ``x / 127.5 - 1`` in [-1, 1] (ADM's convention). The network is called as
    ``net(x, t)`` with ``t = timestep`` for every sample (``timestep=None``: ``net(x)``). Features, in order
    of preference:

    1. ``net.forward_with_features(x, t) -> (logits, features)`` (one pass; tailgen's EncoderUNetModel);
    2. ``net.forward_features(x, t)`` plus ``net(x, t)`` for the logits (two passes);
    3. a forward pre-hook on the input of ``layer`` (a module name) or, by default, of the last
       ``nn.Linear`` in ``net`` (one pass).

    ``resize_to`` optionally resizes (bilinear, antialias off) to the network's input size.
    """

    provides = ("pool", "logits")

    def __init__(self, net: nn.Module, timestep: int | None = 0, *, layer: str | None = None,
                 resize_to: int | None = None, batch_size: int = 256, name: str | None = None):
        super().__init__(batch_size)
        self.net = net.eval().requires_grad_(False)
        self.timestep = timestep
        self.resize_to = resize_to
        self.name = name or type(net).__name__
        self._layer = layer
        self._hook_target: nn.Module | None = None
        if layer is not None:
            modules = dict(net.named_modules())
            if layer not in modules:
                raise ConfigError(f"layer {layer!r} not found in {type(net).__name__}; "
                                  f"candidates: {[n for n in modules if n][-8:]}")
            self._hook_target = modules[layer]
        elif not (hasattr(net, "forward_with_features") or hasattr(net, "forward_features")):
            linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ConfigError(f"{type(net).__name__} has no forward_features and no nn.Linear head; "
                                  "pass layer='<module name>' whose input is the penultimate feature")
            self._hook_target = linears[-1]

    def _identity(self) -> str:
        where = self._layer or ("hook:last-linear" if self._hook_target is not None else "forward_features")
        return (f"classifier/{self.name}/t={self.timestep}/feat={where}/resize={self.resize_to}/"
                f"{module_digest(self.net)[:16]}")

    def _call(self, fn, x):
        if self.timestep is None:
            return fn(x)
        t = torch.full((x.shape[0],), int(self.timestep), dtype=torch.long, device=x.device)
        return fn(x, t)

    def _extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float() / 127.5 - 1.0
        if self.resize_to is not None and tuple(x.shape[-2:]) != (self.resize_to, self.resize_to):
            x = nn.functional.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear",
                                          align_corners=False, antialias=False)
        if self._hook_target is not None:
            captured: list[torch.Tensor] = []
            handle = self._hook_target.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
            try:
                logits = self._call(self.net, x)
            finally:
                handle.remove()
            if not captured:
                raise ConfigError(f"the hooked layer of {self.name} was not called during forward")
            return {"pool": captured[-1].flatten(1), "logits": logits}
        if hasattr(self.net, "forward_with_features"):
            logits, feats = self._call(self.net.forward_with_features, x)
        else:
            feats = self._call(self.net.forward_features, x)
            logits = self._call(self.net, x)
        return {"pool": feats.flatten(1), "logits": logits}


def __getattr__(name: str):
    # InceptionFeatures lives in inception.py (torch-fidelity import cost); exposed here per the contract.
    if name == "InceptionFeatures":
        from tailgen.metrics.inception import InceptionFeatures

        return InceptionFeatures
    raise AttributeError(name)
