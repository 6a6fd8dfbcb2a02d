"""Batched augmentations: crops are shifted windows of the padded image, erasing rectangles stay inside the
stated area range, flips are exact mirror images, one independent draw per sample."""

import torch
import torch.nn.functional as F

from tailgen.data import augment


def test_random_crop_is_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 7, 9, generator=g)
    out = augment.random_crop(x, 2, fill=-1.0, generator=torch.Generator().manual_seed(1))
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    offsets = set()
    for b in range(x.shape[0]):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(padded[b, :, dy:dy + 7, dx:dx + 9], out[b])]
        assert hits, b
        offsets.add(hits[0])
    assert len(offsets) > 10  # independent offsets per sample
    assert torch.equal(augment.random_crop(x, 0), x)


def test_random_erasing_area_and_probability():
    x = torch.ones(400, 1, 28, 28)
    out = augment.random_erasing(x, p=0.5, area=(0.02, 0.25), value=0.0, generator=torch.Generator().manual_seed(0))
    erased = (out == 0).flatten(1).sum(1).float() / (28 * 28)
    hit = erased > 0
    assert 0.4 < hit.float().mean() < 0.6
    assert erased[hit].min() >= 0.01 and erased[hit].max() <= 0.3  # rounding of the sides aside
    for b in torch.nonzero(hit).flatten()[:20].tolist():  # one axis-aligned rectangle
        rows, cols = torch.nonzero(out[b, 0] == 0, as_tuple=True)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert int(h * w) == int((out[b, 0] == 0).sum())


def test_random_flip_mirrors_about_half():
    x = torch.randn(200, 1, 5, 6)
    out = augment.random_flip(x, generator=torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 0.35 < mirrored.float().mean() < 0.65
