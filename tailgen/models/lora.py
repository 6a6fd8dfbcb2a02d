"""Low-rank weight updates on a frozen network (LoRA: Hu et al. 2021, arXiv 2106.09685), the parameter-efficient
expert module of PPAP (Go et al., CVPR 2023; methods.md §6: each expert = the frozen off-the-shelf classifier +
small trainable adapters).

Each chosen conv / linear layer with weight W (out x fan_in after flattening, fan_in = in / groups x kernel) gets::

    W' = W + (alpha / r) B A,     A: (r, fan_in) Kaiming-uniform,  B: (out, r) zero      (LoRA, Hu et al. Eq. 3)

so at initialisation W' = W exactly and the wrapped network computes the backbone's outputs bit for bit. The layer
runs as one conv / matmul with W' (no second branch), so ``merge_lora`` -- which writes W' into a plain layer of the
backbone's type -- gives the same outputs bit for bit and the backbone's state-dict keys: a merged expert loads as a
plain network of the backbone's preset. A and B are float32; W' is formed in float32 and cast to W's dtype.

    net = NetworkSpec(preset="fashion_clean_classifier").build()
    names = add_lora(net, rank=4, alpha=4.0, include=r"input_blocks|middle_block")  # backbone frozen
    optimiser = torch.optim.AdamW(lora_parameters(net), lr=1e-3)
    ...
    merge_lora(net); torch.save(net.state_dict(), "expert0.pt")
"""

from __future__ import annotations

import copy
import math
import re
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tailgen.utils import ConfigError

LORA_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


class LowRankDelta(nn.Module):
    """A frozen ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` (``base``) with a trainable update (alpha / r) B A."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, LORA_TYPES):
            raise ConfigError(f"LoRA wraps Conv1d / Conv2d / Linear layers, got {type(base).__name__}")
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        weight = base.weight
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, weight[0].numel(), device=weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight W (the networks read ``.weight.dtype`` of some layers)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A in the shape of the base weight (float32)."""
        return (self.lora_B @ self.lora_A).view(self.base.weight.shape) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W' = W + delta, formed in float32 and cast to W's dtype, in W's memory layout (what both forward and
        merge use; the layout keeps the convolution's algorithm, hence its bits, those of the plain layer)."""
        weight = self.base.weight
        return torch.empty_like(weight).copy_((weight.float() + self.delta()).to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.merged_weight()
        if isinstance(self.base, nn.Linear):
            return F.linear(x, weight, self.base.bias)
        return self.base._conv_forward(x, weight, self.base.bias)

    def merged(self) -> nn.Module:
        """A plain copy of the base layer holding W' (no LoRA parameters)."""
        layer = copy.deepcopy(self.base)
        with torch.no_grad():
            layer.weight.copy_(self.merged_weight())
        return layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None, include: str = ".*") -> list[str]:
    """Wrap every Conv1d / Conv2d / Linear of ``model`` whose qualified name matches the regex ``include``
    (``re.search``) in a :class:`LowRankDelta`, in place; freeze everything else. ``alpha`` defaults to ``rank``
    (scaling 1). Returns the wrapped layer names (ConfigError if none matched)."""
    pattern = re.compile(include)
    names = [name for name, m in model.named_modules()
             if isinstance(m, LORA_TYPES) and name and pattern.search(name)]
    if not names:
        raise ConfigError(f"add_lora: no Conv1d / Conv2d / Linear layer of {type(model).__name__} matches {include!r}")
    model.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, LowRankDelta(model.get_submodule(name), rank, rank if alpha is None else alpha))
    return names


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable LoRA factors (A, B) of every wrapped layer."""
    for m in model.modules():
        if isinstance(m, LowRankDelta):
            yield m.lora_A
            yield m.lora_B


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LowRankDelta` by a plain layer holding W' (in place; returns ``model``). The merged
    network has the backbone's architecture and state-dict keys and computes the same outputs bit for bit."""
    for name in [n for n, m in model.named_modules() if isinstance(m, LowRankDelta)]:
        _set_submodule(model, name, model.get_submodule(name).merged())
    return model
