"""Batched image augmentations on (B, C, H, W) float tensors in [-1, 1] (one random draw per sample, no loops).

* :func:`random_flip`: horizontal flip with probability 1/2.
* :func:`random_crop`: pad with the background value ``fill`` (-1 = black for Fashion-MNIST) by ``padding``
  pixels on every side, then crop H x W at a uniform offset in {0..2 padding}^2 (the CIFAR/ResNet recipe).
* :func:`random_erasing`: with probability ``p`` replace one rectangle by ``value`` (Zhong et al., "Random Erasing
  Data Augmentation", AAAI 2020): area fraction ~ U(area[0], area[1]), log aspect ratio ~ U(log r, -log r),
  position uniform among those that fit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x: torch.Tensor, padding: int, fill: float = -1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (padding,) * 4, value=fill)
    oy, ox = (torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=x.device))
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    idx = torch.arange(b, device=x.device)[:, None, None, None]
    ch = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[idx, ch, rows, cols].contiguous(memory_format=torch.channels_last
                                              if x.is_contiguous(memory_format=torch.channels_last)
                                              else torch.contiguous_format)


def random_erasing(x: torch.Tensor, p: float = 0.5, area: tuple[float, float] = (0.02, 0.25), ratio: float = 3.0,
                   value: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    if p <= 0:
        return x
    b, _, h, w = x.shape
    u = torch.rand(4, b, generator=generator, device=x.device)
    s = (area[0] + (area[1] - area[0]) * u[0]) * h * w
    r = torch.exp((2 * u[1] - 1) * math.log(ratio))
    eh = torch.sqrt(s * r).round().clamp(1, h)
    ew = torch.sqrt(s / r).round().clamp(1, w)
    y0 = ((h - eh + 1) * u[2]).floor()
    x0 = ((w - ew + 1) * u[3]).floor()
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])  # (B, H)
    in_x = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # (B, W)
    on = torch.rand(b, generator=generator, device=x.device) < p
    mask = (in_y[:, :, None] & in_x[:, None, :] & on[:, None, None])[:, None]
    return torch.where(mask, torch.full_like(x, value), x)


__all__ = ["random_flip", "random_crop", "random_erasing"]
