"""Downsampling for cascades: the low-resolution image a super-resolution model is conditioned on, and the training
images of a cascade's first stage, made by one function so both see the same values.

:func:`area_downsample` -- x in [-1, 1] (N, C, H, W), H = W = f * s for an integer factor f:

    quantize=True (tailgen's default):
        k       = round((x + 1) * 127.5)                  uint8 levels (exact for images that came from uint8 bytes)
        m       = F.interpolate(k, size=s, mode="area")  mean of each f x f block
        low_res = round(m) / 127.5 - 1                   back on the 256 uint8 levels (ties to even)
    quantize=False (guided-diffusion's super_res_train.py exactly):
        low_res = F.interpolate(x, size=s, mode="area")  float block means, off the uint8 levels

With ``quantize`` the result is exactly ``from_uint8`` of a uint8 image, the values a cascade's second stage reads
from a first stage's samples.npz (``k / 127.5 - 1``); a first stage trained on these images models the same set.
For f a power of two the block mean of f^2 integers is exact in float32, so the rounding is exact; odd f has no ties.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tailgen.utils.errors import ConfigError


def check_factor(size: int, small: int, what: str = "low-resolution size") -> int:
    """The integer factor ``size // small``; ConfigError unless ``small`` divides ``size`` and is smaller."""
    if not (isinstance(small, int) and 0 < small < size and size % small == 0):
        raise ConfigError(f"{what} {small!r} must be smaller than and divide the image size {size} "
                          f"(area downsampling by an integer factor), e.g. {size // 2}")
    return size // small


def area_downsample(x: torch.Tensor, size: int, quantize: bool = True) -> torch.Tensor:
    """(N, C, H, H) in [-1, 1] -> (N, C, size, size) in [-1, 1]: area (block-mean) downsampling of the uint8 levels,
    rounded back to uint8 levels when ``quantize``; see the module docstring."""
    check_factor(x.shape[-1], size)
    if x.shape[-2] != x.shape[-1]:
        raise ConfigError(f"area_downsample takes square images, got {tuple(x.shape)}")
    if not quantize:
        return F.interpolate(x.float(), size=(size, size), mode="area")
    levels = torch.round((x.float() + 1) * 127.5).clamp_(0, 255)
    return torch.round(F.interpolate(levels, size=(size, size), mode="area")) / 127.5 - 1


__all__ = ["area_downsample", "check_factor"]
