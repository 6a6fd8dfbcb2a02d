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


def _text_strip(texts: list[str], height: int, pad: int, channels: int) -> np.ndarray:
    """A white column (uint8 rows x W x C) with ``texts[r]`` written at the left of row r (PIL's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = max((int(font.getbbox(t)[2]) for t in texts), default=0) + 2 * pad + 2
    rows = len(texts)
    image = Image.new("L", (width, max(1, rows * (height + pad) - pad)), 255)
    draw = ImageDraw.Draw(image)
    for r, text in enumerate(texts):
        top, bottom = font.getbbox(text)[1], font.getbbox(text)[3]
        draw.text((pad, r * (height + pad) + (height - (bottom - top)) // 2 - top), text, fill=0, font=font)
    return np.repeat(np.asarray(image, dtype=np.uint8)[..., None], channels, axis=2)


def class_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str] | tuple[str, ...] | None = None,
               per_class: int = 10, pad: int = 2) -> np.ndarray:
    """uint8 N×H×W×C + labels -> one uint8 image with one row per class present (ascending), each row labelled at
    its left with the class name (``class_names[label]``) or index and holding that class's first ``per_class``
    samples in order; rows with fewer samples are padded white. Whatever N is, a row never mixes classes."""
    images, labels = np.asarray(images), np.asarray(labels).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"class_grid: {len(images)} images but {len(labels)} labels")
    n, h, w, c = images.shape
    classes = np.unique(labels)
    counts = [min(per_class, int((labels == k).sum())) for k in classes]
    ncol = max(counts, default=1)
    blank = np.full((h, w, c), 255, dtype=np.uint8)
    tiles = []
    for k, count in zip(classes, counts):
        row = list(images[labels == k][:count]) + [blank] * (ncol - count)
        tiles.extend(row)
    if not tiles:
        return np.full((h, w, c), 255, dtype=np.uint8)
    grid = make_grid(np.stack(tiles), nrow=ncol, pad=pad)
    names = [str(class_names[k]) if class_names is not None and 0 <= k < len(class_names) else str(int(k))
             for k in classes]
    strip = _text_strip(names, h, pad, c)
    return np.concatenate([strip, grid], axis=1)
