"""k-NN manifold metrics: precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).

Notation: real X (N), fake Y (M), NND_k(x) = distance from x to its k-th nearest neighbour in its own set,
excluding itself (= the (k+1)-th smallest distance of its row when the self-distance 0 is included, as in
both ADM's ``ManifoldEstimator`` and the ``prdc`` package). B(x, r) is the ball of radius r; "inside" is
``d <= r`` by default (``inclusive=True``, ADM) or ``d < r`` (``inclusive=False``, prdc).

* precision = 1/M  sum_j 1[exists i: Y_j in B(X_i, NND_kpr(X_i))]
* recall    = 1/N  sum_i 1[exists j: X_i in B(Y_j, NND_kpr(Y_j))]
* density   = 1/(k_dc M) sum_j sum_i 1[Y_j in B(X_i, NND_kdc(X_i))]
* coverage  = 1/N  sum_i 1[exists j: Y_j in B(X_i, NND_kdc(X_i))]

Defaults k_pr = 3 (ADM evaluator), k_dc = 5 (Naeem et al.). The prdc package uses one k for all four.

Convention and why: comparisons use squared Euclidean distances (ADM; monotone, so the same decisions as
prdc's Euclidean ones) and ``<=``. The two conventions differ only on exact ties, which have probability 0 for
continuous features but happen for duplicated images (identical features): with ``<`` a point with >= k exact
duplicates has radius 0 and covers nothing, not even an identical sample; with ``<=`` it does. Self-distances
are set to exactly 0 (as sklearn does for X vs X), so NND counts duplicates as neighbours as both references do.

Memory: distances are computed in (block_size x block_size) tiles with ||a||^2 + ||b||^2 - 2 a.b (clamped at 0);
k-NN radii by a running ``topk`` over column tiles. The N x M matrix is never materialised; peak extra memory is
a few tiles (block_size=4096 in fp32: ~64 MB per tile). Cost: (N^2 + M^2 + N M) d multiply-adds.
Computation dtype: the inputs' (promoted, at least float32); pass float64 features for bit-stable tests.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tailgen.metrics._states import FeatureSetMetric
from tailgen.utils import ConfigError, DataError

__all__ = ["prdc", "manifold_masks", "knn_radii", "prepare_pair", "cross_tiles", "PrecisionRecallDensityCoverage"]


def _prepare(x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise DataError(f"{name} features must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not torch.isfinite(x.sum(dim=1)).all():  # row sums: no N x D temporary (NaN/inf propagate)
        raise DataError(f"{name} features contain NaN or inf")
    return x.to(dtype)


def _dtype(*xs: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for x in xs:
        if x.dtype == torch.float64:
            dt = torch.float64
    return dt


def _sq_norms(x: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Row-wise squared norms, computed in row blocks (no N x D temporary)."""
    return torch.cat([(part * part).sum(1) for part in x.split(block)])


def _sq_dist(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) of one tile."""
    d = a @ b.T
    d.mul_(-2.0).add_(a_sq[:, None]).add_(b_sq[None, :])
    return d.clamp_min_(0.0)


def _check_block(block_size: int) -> int:
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    return int(block_size)


@torch.no_grad()
def knn_radii(x: torch.Tensor, ks: Sequence[int], block_size: int = 4096, squared: bool = True) -> torch.Tensor:
    """NND_k(x_i) for each k in ``ks``: tensor (len(ks), N), squared unless ``squared=False``.

    Row tiles of x against column tiles of x; a running ``topk(kmax + 1, largest=False)`` per row keeps the
    smallest distances seen (self included, set to exactly 0), so memory is O(block^2 + N k).
    """
    block_size = _check_block(block_size)
    x = _prepare(x, _dtype(x), "input")
    n = x.shape[0]
    ks = [int(k) for k in ks]
    if min(ks) < 1:
        raise ConfigError(f"k must be >= 1, got {ks}")
    keep = max(ks) + 1
    if n < keep:
        raise DataError(f"need more than k={max(ks)} feature vectors for k-NN radii, got {n}")
    sq = _sq_norms(x)
    out = torch.empty(len(ks), n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, block_size):
        r1 = min(r0 + block_size, n)
        best = None
        for c0 in range(0, n, block_size):
            c1 = min(c0 + block_size, n)
            d = _sq_dist(x[r0:r1], sq[r0:r1], x[c0:c1], sq[c0:c1])
            lo, hi = max(r0, c0), min(r1, c1)
            if lo < hi:  # this tile holds part of the diagonal
                idx = torch.arange(lo, hi, device=x.device)
                d[idx - r0, idx - c0] = 0.0
            tile_best = torch.topk(d, min(keep, d.shape[1]), dim=1, largest=False, sorted=True).values
            if best is not None:
                merged = torch.cat([best, tile_best], dim=1)
                tile_best = torch.topk(merged, min(keep, merged.shape[1]), dim=1, largest=False, sorted=True).values
            best = tile_best
        out[:, r0:r1] = best[:, ks].T
    return out if squared else out.sqrt()


def prepare_pair(real, fake) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and fake features as 2-D tensors of one dtype on the real side's device (checked: finite, same D)."""
    dtype = _dtype(torch.as_tensor(real), torch.as_tensor(fake))
    real = _prepare(real, dtype, "real")
    fake = _prepare(fake, dtype, "fake").to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    return real, fake


def cross_tiles(real: torch.Tensor, fake: torch.Tensor, block_size: int):
    """Yield ``(rows, cols, d)``: slices of real / fake and their squared distances, one (block x block) tile at a
    time (the N x M matrix is never held)."""
    r_sq, f_sq = _sq_norms(real), _sq_norms(fake)
    for r0 in range(0, real.shape[0], block_size):
        rows = slice(r0, min(r0 + block_size, real.shape[0]))
        for c0 in range(0, fake.shape[0], block_size):
            cols = slice(c0, min(c0 + block_size, fake.shape[0]))
            yield rows, cols, _sq_dist(real[rows], r_sq[rows], fake[cols], f_sq[cols])


@torch.no_grad()
def manifold_masks(real: torch.Tensor, fake: torch.Tensor, k_pr: int = 3, k_dc: int = 5, *,
                   inclusive: bool = True, block_size: int = 4096) -> dict[str, torch.Tensor]:
    """Per-point indicators behind `prdc` (for restricted metrics, e.g. coverage of rare-mode reals).

    Returns ``fake_in_real`` (M, bool; precision), ``fake_count`` (M, long: number of real k_dc-balls holding
    Y_j; density), ``real_in_fake`` (N, bool; recall), ``real_covered`` (N, bool; coverage).
    """
    block_size = _check_block(block_size)
    real, fake = prepare_pair(real, fake)
    inside = torch.le if inclusive else torch.lt
    r_radii = knn_radii(real, [k_pr, k_dc], block_size)
    r_pr, r_dc = r_radii[0], r_radii[1]
    f_pr = knn_radii(fake, [k_pr], block_size)[0]
    n, m = real.shape[0], fake.shape[0]
    dev = real.device
    fake_in_real = torch.zeros(m, dtype=torch.bool, device=dev)
    fake_count = torch.zeros(m, dtype=torch.long, device=dev)
    real_in_fake = torch.zeros(n, dtype=torch.bool, device=dev)
    real_covered = torch.zeros(n, dtype=torch.bool, device=dev)
    for rows, cols, d in cross_tiles(real, fake, block_size):
        fake_in_real[cols] |= inside(d, r_pr[rows, None]).any(0)
        in_dc = inside(d, r_dc[rows, None])
        fake_count[cols] += in_dc.sum(0)
        real_covered[rows] |= in_dc.any(1)
        real_in_fake[rows] |= inside(d, f_pr[None, cols]).any(1)
    return {"fake_in_real": fake_in_real, "fake_count": fake_count,
            "real_in_fake": real_in_fake, "real_covered": real_covered}


def prdc(real_features: torch.Tensor, fake_features: torch.Tensor, k_pr: int = 3, k_dc: int = 5, *,
         inclusive: bool = True, block_size: int = 4096) -> dict[str, float]:
    """Precision, recall (k = ``k_pr``), density, coverage (k = ``k_dc``) of fake vs real features (N x D, M x D).

    With ``k_pr == k_dc == k`` and ``inclusive=False`` this equals ``prdc.compute_prdc(real, fake, k)``.
    """
    masks = manifold_masks(real_features, fake_features, k_pr, k_dc, inclusive=inclusive, block_size=block_size)
    m = masks["fake_count"].numel()
    return {
        "precision": masks["fake_in_real"].double().mean().item(),
        "recall": masks["real_in_fake"].double().mean().item(),
        "density": masks["fake_count"].double().sum().item() / (k_dc * m),
        "coverage": masks["real_covered"].double().mean().item(),
    }


class PrecisionRecallDensityCoverage(FeatureSetMetric):
    """``update(features, real=False)``; ``compute() -> dict(precision, recall, density, coverage)`` (floats).

    Real features: `set_reference_features` (not a state; load it on every rank, e.g. ADM's 10k reference
    batch) or ``update(x, real=True)`` (gathered). Memory: all fake features (50k x 2048 fp32 = 400 MB);
    ``compute_on_cpu=True`` keeps them on the host. Math and conventions: module docstring.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, k_pr: int = 3, k_dc: int = 5, *, inclusive: bool = True, block_size: int = 4096, **kwargs):
        super().__init__(**kwargs)
        self.k_pr, self.k_dc, self.inclusive, self.block_size = k_pr, k_dc, inclusive, block_size

    def compute(self) -> dict[str, float]:
        real, fake = self.feature_sets("precision/recall")
        return prdc(real, fake, self.k_pr, self.k_dc, inclusive=self.inclusive,
                    block_size=self.block_size)
