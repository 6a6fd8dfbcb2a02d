"""Per-class tail indicators from a clean domain classifier's logits on the samples and the requested labels.

For samples x_j requested with label y_j and p = softmax(classifier(x_j)):

* accuracy        = mean 1[argmax p = y_j]                      (class fidelity)
* confidence      = mean p(y_j | x_j)                            (probability of the *requested* class)
* low_conf_share  = mean 1[p(y_j | x_j) < threshold]             (share of ambiguous / low-density samples)
* entropy         = mean H(p)                                     (nats)

Pooled over all samples (``tail/...``) and per requested class (``class/<c>/...``); ``tail/accuracy_class_min``
is the worst class. Sum states of size num_classes (DDP: summed). Note (toy study §4): confidence measures class
ambiguity, not density; a rare but prototypical mode can look *more* confident.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from tailgen.utils import ConfigError, DataError

__all__ = ["TailIndicators"]

_STATS = ("correct", "confidence", "low_conf", "entropy")


class TailIndicators(Metric):
    """``update(logits (N, C), labels (N,))``; ``compute() -> dict[str, float]``."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int, threshold: float = 0.5, per_class: bool = True, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1 or not 0.0 < threshold <= 1.0:
            raise ConfigError(f"need num_classes >= 1 and 0 < threshold <= 1, got {num_classes}, {threshold}")
        self.num_classes, self.threshold, self.per_class = int(num_classes), float(threshold), per_class
        self.add_state("count", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        for name in _STATS:
            self.add_state(name, torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.detach().double()
        labels = torch.as_tensor(labels, device=logits.device).long().flatten()
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise DataError(f"logits (N, C) and labels (N,) disagree: {tuple(logits.shape)}, {tuple(labels.shape)}")
        if logits.shape[1] < self.num_classes or labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(f"labels must lie in [0, {self.num_classes}) and logits have >= num_classes columns")
        log_p = torch.log_softmax(logits, dim=1)
        p_y = log_p.gather(1, labels[:, None]).squeeze(1).exp()
        values = {
            "correct": (log_p.argmax(1) == labels).double(),
            "confidence": p_y,
            "low_conf": (p_y < self.threshold).double(),
            "entropy": -(log_p.exp() * log_p).sum(1),
        }
        self.count = self.count + torch.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        for name, v in values.items():
            setattr(self, name, getattr(self, name) + torch.zeros_like(getattr(self, name)).index_add_(0, labels, v))

    def compute(self) -> dict[str, float]:
        count = self.count.double()
        total = count.sum()
        if total == 0:
            raise DataError("TailIndicators has no samples")
        names = {"correct": "accuracy", "confidence": "confidence", "low_conf": "low_conf_share", "entropy": "entropy"}
        out = {f"tail/{names[s]}": (getattr(self, s).sum() / total).item() for s in _STATS}
        seen = count > 0
        acc = self.correct / count.clamp_min(1)
        out["tail/accuracy_class_min"] = acc[seen].min().item()
        if self.per_class:
            for c in torch.nonzero(seen).flatten().tolist():
                for s in _STATS:
                    out[f"class/{c}/{names[s]}"] = (getattr(self, s)[c] / count[c]).item()
        return out
