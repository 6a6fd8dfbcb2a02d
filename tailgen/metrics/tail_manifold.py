"""k-NN tail metrics: rarity score (Han et al. 2023) and tail / head coverage with capped balls.

Notation as `tailgen.metrics.manifold`: real X (N), fake Y (M), NND_k(x) = distance from x to its k-th nearest
neighbour in its own set (self excluded), "inside" is ``d <= r`` (``inclusive=True``) or ``d < r``.

**Rarity score** (Han, Choi, Choi, Kim, Ha & Choi, "Rarity Score: A New Metric to Evaluate the Uncommonness of
Synthesized Images", ICLR 2023; arXiv 2206.08549): a real point in a sparse region has a large k-NN ball, so a sample that
only the large balls contain is uncommon:

    RS(Y_j) = min { NND_k(X_i) : Y_j in B(X_i, NND_k(X_i)) }        (Euclidean distance units)

defined for samples inside at least one real ball (the others are off the real manifold and are discarded).
Reported: ``rarity`` = mean RS over the in-manifold samples (NaN when there is none) and ``rarity_outside`` =
share of samples inside no real ball (1 - precision at the same k). Default k = 3 (the authors' README example
``nearest_k = 3``). Note: the authors' code takes the radius at index k+1 of each sorted distance row
(self at index 0), i.e. NND_{k+1}; tailgen uses NND_k as the paper's text and as precision/recall here, so
tailgen's k = 3 is their code's k = 2. RS is in feature units: compare it only within one feature space and one
reference set (its scale grows as the reference shrinks).

**Tail coverage** (tailgen): coverage of the least-dense reals. The reference is split by density: the *tail*
T = the ceil(tail_fraction N) reals with the largest NND_k (k = ``k_tail``, default 5 as coverage; ties broken by
index), the *head* H = the rest. Coverage's own rule (X_i covered when some Y_j lies in B(X_i, NND_k(X_i))) rewards
the tail: a tail point has a large ball, so it is *easier* to cover, even by samples far from it (measured below:
with coverage's own balls 1,000 random train images cover 0.985 of the tail vs 0.956 of the head, and 1,000 class
prototypes still cover 0.605 of the tail; judge features 1.0 vs 0.978, prototypes 0.81). tailgen caps every ball at the head/tail boundary: with R = min_{i in T} NND_k(X_i) (the
smallest tail radius = the largest head radius),

    r_i = min(NND_k(X_i), R)
    tail_coverage = 1/|T| sum_{i in T} 1[exists j: ||X_i - Y_j|| <= r_i]      (every tail ball has radius R)
    head_coverage = 1/|H| sum_{i in H} 1[exists j: ||X_i - Y_j|| <= r_i]      (= coverage restricted to H)

so no tail ball is larger than any head ball: a tail real counts as covered only when a sample lands as close to
it as the sparsest head reals are to their k-th neighbour. Head coverage keeps coverage's density-invariance
(a sample set drawn from the real distribution covers each head point with about the same probability). A fully
common radius (e.g. the median NND_k for every real) was rejected: it leaves even a fresh real sample set only
~0.15 tail coverage, no room between real data and prototypes. Measured (tests/test_metrics_tail_manifold.py:
1,000 test images vs 1,000 train images; prototypes = the 100 per class nearest their class mean among 3,000):
domain features random tail 0.725 / head 0.956, prototypes 0.325 / 0.808; judge features 0.795 / 0.978 vs
0.525 / 0.898.

Memory: blocked as `manifold.py` (real radii by `knn_radii`, (block x block) tiles of the real x fake distances;
no N x M matrix). Cost: (N^2 + N M) d; no fake x fake distances.
"""

from __future__ import annotations

import math

import torch

from tailgen.metrics._states import FeatureSetMetric
from tailgen.metrics.manifold import _check_block, cross_tiles, knn_radii, prepare_pair
from tailgen.utils import ConfigError, DataError

__all__ = ["tail_masks", "tail_manifold", "rarity_scores", "TailManifold", "TAIL_MANIFOLD_KEYS"]

TAIL_MANIFOLD_KEYS = {"rarity": ("rarity", "rarity_outside"), "tail_coverage": ("tail_coverage", "head_coverage")}


def _check(k_rarity: int, k_tail: int, tail_fraction: float) -> None:
    if k_rarity < 1 or k_tail < 1:
        raise ConfigError(f"k must be >= 1, got k_rarity={k_rarity}, k_tail={k_tail}")
    if not 0.0 < tail_fraction < 1.0:
        raise ConfigError(f"tail_fraction must lie in (0, 1), got {tail_fraction}")


@torch.no_grad()
def tail_masks(real: torch.Tensor, fake: torch.Tensor, k_rarity: int = 3, k_tail: int = 5,
               tail_fraction: float = 0.2, *, inclusive: bool = True, block_size: int = 4096) -> dict:
    """Per-point quantities behind `tail_manifold` (module docstring).

    Returns ``rarity`` (M, float: RS of each sample, NaN outside every real ball), ``is_tail`` (N, bool),
    ``covered`` (N, bool: some sample within the capped radius r_i), ``radius`` (the cap R, float) and
    ``real_radius`` (N: NND_{k_tail} of each real, Euclidean, before the cap).
    """
    _check(k_rarity, k_tail, tail_fraction)
    block_size = _check_block(block_size)
    real, fake = prepare_pair(real, fake)
    if fake.shape[0] == 0:
        raise DataError("tail metrics need at least one fake feature vector")
    inside = torch.le if inclusive else torch.lt
    radii = knn_radii(real, [k_rarity, k_tail], block_size)  # squared
    r_rs, r_tail = radii[0], radii[1]
    n, m = real.shape[0], fake.shape[0]
    n_tail = math.ceil(tail_fraction * n)
    order = torch.sort(r_tail, descending=True, stable=True).indices
    is_tail = torch.zeros(n, dtype=torch.bool, device=real.device)
    is_tail[order[:n_tail]] = True
    cap_sq = r_tail[order[n_tail - 1]]  # smallest tail radius (squared)
    capped = torch.minimum(r_tail, cap_sq)
    best = torch.full((m,), math.inf, dtype=real.dtype, device=real.device)  # squared RS
    covered = torch.zeros(n, dtype=torch.bool, device=real.device)
    for rows, cols, d in cross_tiles(real, fake, block_size):
        ball = r_rs[rows, None]
        cand = torch.where(inside(d, ball), ball.expand_as(d), torch.full_like(d, math.inf)).amin(0)
        best[cols] = torch.minimum(best[cols], cand)
        covered[rows] |= inside(d, capped[rows, None]).any(1)
    rarity = torch.where(torch.isfinite(best), best.sqrt(), torch.full_like(best, math.nan))
    return {"rarity": rarity, "is_tail": is_tail, "covered": covered, "radius": float(cap_sq.sqrt()),
            "real_radius": r_tail.sqrt()}


def rarity_scores(real: torch.Tensor, fake: torch.Tensor, k: int = 3, **kwargs) -> torch.Tensor:
    """RS of each fake sample (M,), NaN for samples inside no real k-NN ball (e.g. to show the rarest samples)."""
    kwargs.setdefault("k_tail", k)  # the tail split is not used here; avoid needing more than k + 1 reals
    return tail_masks(real, fake, k_rarity=k, **kwargs)["rarity"]


def summarize(masks: dict) -> dict[str, float]:
    """``rarity, rarity_outside, tail_coverage, head_coverage`` from `tail_masks` output."""
    rs, tail, covered = masks["rarity"], masks["is_tail"], masks["covered"]
    inside = ~torch.isnan(rs)
    return {
        "rarity": rs[inside].double().mean().item() if inside.any() else math.nan,
        "rarity_outside": (~inside).double().mean().item(),
        "tail_coverage": covered[tail].double().mean().item() if tail.any() else math.nan,
        "head_coverage": covered[~tail].double().mean().item() if (~tail).any() else math.nan,
    }


def tail_manifold(real_features: torch.Tensor, fake_features: torch.Tensor, k_rarity: int = 3, k_tail: int = 5,
                  tail_fraction: float = 0.2, *, inclusive: bool = True, block_size: int = 4096) -> dict[str, float]:
    """``rarity, rarity_outside, tail_coverage, head_coverage`` of fake vs real features (module docstring)."""
    return summarize(tail_masks(real_features, fake_features, k_rarity, k_tail, tail_fraction,
                                inclusive=inclusive, block_size=block_size))


class TailManifold(FeatureSetMetric):
    """``update(features, real=False)``; ``compute() -> dict(rarity, rarity_outside, tail_coverage,
    head_coverage)``. Reference: `set_reference_features` (every rank) or ``update(x, real=True)`` (gathered).
    ``cat`` feature states, DDP-synchronised (empty ranks allowed)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, k_rarity: int = 3, k_tail: int = 5, tail_fraction: float = 0.2, *, inclusive: bool = True,
                 block_size: int = 4096, **kwargs):
        super().__init__(**kwargs)
        _check(k_rarity, k_tail, tail_fraction)
        self.k_rarity, self.k_tail, self.tail_fraction = int(k_rarity), int(k_tail), float(tail_fraction)
        self.inclusive, self.block_size = inclusive, block_size

    def compute(self) -> dict[str, float]:
        real, fake = self.feature_sets("rarity / tail coverage")
        return tail_manifold(real, fake, self.k_rarity, self.k_tail, self.tail_fraction,
                             inclusive=self.inclusive, block_size=self.block_size)
