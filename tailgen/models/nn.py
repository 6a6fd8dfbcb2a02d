"""Building blocks of the ADM networks (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021, IDDPM).

Everything here reproduces guided-diffusion's numerics exactly: GroupNorm (32 groups, eps 1e-5) computed
in float32, SiLU activations, the sinusoidal timestep embedding with the cos half first, zero-initialised
output layers, and the fp16 torso conversion rule (convs only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from tailgen.utils import ConfigError

NUM_GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input dtype (ADM `normalization`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        return nn.functional.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """GroupNorm with 32 groups and eps 1e-5 over `channels` channels."""
    return GroupNorm32(NUM_GROUPS, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """Conv1d / Conv2d / Conv3d chosen by `dims`."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """AvgPool1d / AvgPool2d / AvgPool3d chosen by `dims`."""
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place (ADM zero-initialises residual outputs) and return it."""
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            nn.init.zeros_(parameter.data)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_k), sin(t f_k)] with f_k = exp(-ln(max_period) k / half), k < dim // 2.

    `timesteps` is a 1-D tensor (int or float) of original step indices; the result is float32 (B, dim),
    cos half first, then sin (guided-diffusion `timestep_embedding`); odd `dim` is padded with one zero.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def as_timestep_tensor(timesteps, batch_size: int, device: torch.device) -> torch.Tensor:
    """Turn an int / float / 0-d / 1-d timestep argument into a 1-D tensor of length `batch_size`."""
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor(timesteps, device=device)
    timesteps = timesteps.to(device)
    if timesteps.dim() == 0:
        return timesteps.expand(batch_size)
    if timesteps.dim() != 1 or timesteps.shape[0] not in (1, batch_size):
        raise ConfigError(
            f"timesteps must be a scalar or a 1-D tensor of length {batch_size} (the batch size), "
            f"got shape {tuple(timesteps.shape)}"
        )
    return timesteps.expand(batch_size)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep (+ label) embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes the embedding to the children that are `TimestepBlock`s."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def maybe_checkpoint(function: Callable, inputs: tuple, enabled: bool):
    """Gradient checkpointing (recompute activations in backward) when `enabled` and grads are on."""
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(function, *inputs, use_reentrant=False)
    return function(*inputs)


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_convs(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the weight and bias of every Conv1d/2d/3d inside `module` to `dtype` (ADM fp16 rule)."""
    for child in module.modules():
        if isinstance(child, _CONV_TYPES):
            child.weight.data = child.weight.data.to(dtype)
            if child.bias is not None:
                child.bias.data = child.bias.data.to(dtype)
