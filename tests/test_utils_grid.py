"""Class grids: one labelled row per class present, whatever N is (not a multiple of the class count)."""

from __future__ import annotations

import numpy as np
import pytest

from tailgen.data.fashion_mnist import CLASS_NAMES
from tailgen.module.writer import class_sorted_grid
from tailgen.utils.images import class_grid

H = W = 8
PAD = 2


def _tiles(grid: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(label strip, tiles[r][k]) of a class grid with ``rows`` x ``cols`` tiles."""
    strip_width = grid.shape[1] - (cols * (W + PAD) - PAD)
    body = grid[:, strip_width:]
    tiles = np.stack([np.stack([body[r * (H + PAD): r * (H + PAD) + H, k * (W + PAD): k * (W + PAD) + W]
                                for k in range(cols)]) for r in range(rows)])
    return grid[:, :strip_width], tiles


@pytest.mark.parametrize("n", [7, 23, 31])
def test_one_row_per_class_in_order(n):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 5, n)
    labels[:3] = [4, 0, 2]  # at least three classes present
    images = rng.integers(0, 200, (n, H, W, 3), dtype=np.uint8)  # < 255: tiles never look like padding
    grid = class_grid(images, labels, per_class=6, pad=PAD)
    classes = np.unique(labels)
    cols = min(6, max(int((labels == k).sum()) for k in classes))
    assert grid.shape[0] == len(classes) * (H + PAD) - PAD
    strip, tiles = _tiles(grid, len(classes), cols)
    for r, k in enumerate(classes):
        mine = images[labels == k][:6]
        assert np.array_equal(tiles[r, :len(mine)], mine), (n, k)  # this class's samples, in order
        assert (tiles[r, len(mine):] == 255).all()  # then white padding, never another class
        band = strip[r * (H + PAD): r * (H + PAD) + H]
        assert (band < 128).any(), f"row {r} (class {k}) has no label"
    assert strip.shape[1] > 4


def test_labels_are_names_or_indices():
    images = np.full((4, 12, 12, 1), 100, np.uint8)
    labels = np.array([0, 9, 9, 0])
    named = class_grid(images, labels, CLASS_NAMES)
    indexed = class_grid(images, labels)
    assert named.shape[1] > indexed.shape[1]  # "Ankle boot" needs a wider strip than "9"
    assert named.shape[0] == indexed.shape[0] == 2 * 12 + 2


def test_writer_grid_keeps_rows_per_class():
    rng = np.random.default_rng(0)
    labels = np.arange(13) % 10
    images = rng.integers(0, 200, (13, H, W, 1), dtype=np.uint8)
    grid = class_sorted_grid(images, labels, max_images=100)
    assert grid.shape[0] == 10 * (H + PAD) - PAD


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        class_grid(np.zeros((3, 4, 4, 1), np.uint8), np.array([0, 1]))
