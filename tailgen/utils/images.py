"""Image conversions and sample grids (numpy / PIL, no Lightning)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from tailgen.utils.io import atomic_write


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC, as guided-diffusion saves samples: ((x + 1) * 127.5).clamp(0, 255) truncated."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8(images: Tensor | np.ndarray) -> Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (k / 127.5 - 1)."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 N×H×W×C -> one uint8 image (rows of ``nrow``), white padding between tiles."""
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    canvas = np.full((ncol * nrow, h + pad, w + pad, c), 255, dtype=np.uint8)
    canvas[:n, :h, :w] = images
    grid = rearrange(canvas, "(r k) h w c -> (r h) (k w) c", k=nrow)
    return grid[: grid.shape[0] - pad, : grid.shape[1] - pad]


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 H×W×C (C = 1 or 3) array as PNG, atomically."""
    from PIL import Image

    array = image[..., 0] if image.shape[-1] == 1 else image
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
