"""Inception Score (Salimans et al. 2016) as in ADM's evaluator.

IS = mean over splits s of exp( mean_{i in s} KL(p(y|x_i) || p_s(y)) ), p_s(y) = mean_{i in s} p(y|x_i),
p(y|x) = softmax(logits). ADM: logits = pool_3 @ W_softmax without the bias (1008 classes; `InceptionFeatures`
``logits``), contiguous splits of 5000 for 50k samples (= 10 splits), returns the mean only (no std).

Splits are contiguous chunks of ``ceil(N / splits)`` samples in update order (or ``split_size`` as ADM).
Under DDP the gathered order is rank-major, so split membership (not the pooled p(y)) differs from a single
process run; the mean over splits is unaffected in expectation.
"""

from __future__ import annotations

import math

import torch

from tailgen.metrics._states import GatherSafeMetric, cat_state
from tailgen.utils import ConfigError, DataError

__all__ = ["inception_score", "InceptionScore"]


def inception_score(logits: torch.Tensor, splits: int = 10, split_size: int | None = None) -> tuple[float, float]:
    """(mean, std) of the per-split scores (ADM reports the mean). Computed in float64."""
    logits = torch.as_tensor(logits).detach().double()
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise DataError(f"logits must be (N > 0, C), got {tuple(logits.shape)}")
    n = logits.shape[0]
    if split_size is None:
        if splits < 1:
            raise ConfigError(f"splits must be >= 1, got {splits}")
        split_size = math.ceil(n / splits)
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(scores) > 1 else 0.0


class InceptionScore(GatherSafeMetric):
    """IS from classifier logits (``cat`` state, gathered under DDP); ``compute() -> tensor`` (mean)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, splits: int = 10, split_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.splits, self.split_size = splits, split_size
        self.add_state("logits", [], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor) -> None:
        self.logits.append(logits.detach().float())

    def compute(self) -> torch.Tensor:
        logits = cat_state(self.logits)
        if logits is None:
            raise DataError("InceptionScore has no samples")
        return torch.tensor(inception_score(logits, self.splits, self.split_size)[0], dtype=torch.float64)
