"""Class-conditional metrics: precision / recall / density / coverage and FID within each class.

For class c: real_c = reference features with label c, fake_c = samples *requested* with label c;
metric_c = metric(real_c, fake_c). Optional ``tail``: rarity (``rarity``, ``rarity_outside``) and / or tail coverage
(``tail_coverage``, ``head_coverage``) of `tailgen.metrics.tail_manifold` within each class (the tail is the
least-dense ``tail_fraction`` of that class's reals; the common radius is that class's median k-NN radius).
Means over classes skip classes where a value is undefined (NaN: rarity with no sample inside any ball). Reported per class (``class/<c>/<metric>``) and as the unweighted mean over
evaluated classes (``classwise/<metric>_mean``). A class is evaluated when both sides have more than
``max(k_pr, k_dc)`` samples (k-NN radii need k + 1 points); ``classwise/num_classes`` counts them.

Why (toy study §4): pooled recall and FID hide the loss of a rare mode inside a class; class-wise FID
(cFD there) moved 10-20x more than pooled FD. Caveats: with few samples per class (ImageNet: 10 reference images
per class in ADM's 10k batch) k-NN radii are large and FID is strongly biased upwards (bias ~ d / n); compare
class-wise numbers only at equal sample counts. Per-class FID uses `frechet_distance_features` (exact for n < d).

States: ``cat`` (features, labels), gathered under DDP with uneven per-rank sizes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from tailgen.metrics._states import GatherSafeMetric, cat_count, cat_state
from tailgen.metrics.fid import frechet_distance_features
from tailgen.metrics.manifold import prdc
from tailgen.metrics.tail_manifold import TAIL_MANIFOLD_KEYS, tail_manifold
from tailgen.utils import ConfigError, DataError

__all__ = ["ClassConditionalMetrics"]

_MANIFOLD = ("precision", "recall", "density", "coverage")


class ClassConditionalMetrics(GatherSafeMetric):
    """``update(features, labels, real=False)``; reference via `set_reference`; ``compute() -> dict``.

    Args:
        num_classes: labels lie in [0, num_classes).
        fid: also compute per-class FID.
        per_class: include ``class/<c>/...`` keys (1000 classes x 5 metrics for ImageNet; off to log less).
        tail: among ``rarity`` (k = k_pr), ``tail_coverage`` (k = k_dc): class-wise tail metrics.
        tail_fraction: share of each class's least-dense reals forming its tail.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int, *, k_pr: int = 3, k_dc: int = 5, fid: bool = True,
                 per_class: bool = True, inclusive: bool = True, block_size: int = 4096,
                 tail: Sequence[str] = (), tail_fraction: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        unknown = sorted(set(tail) - set(TAIL_MANIFOLD_KEYS))
        if unknown:
            raise ConfigError(f"unknown class-wise tail metrics {unknown}; choose from {sorted(TAIL_MANIFOLD_KEYS)}")
        self.tail_keys = [key for name in tail for key in TAIL_MANIFOLD_KEYS[name]]
        self.tail_fraction = float(tail_fraction)
        self.num_classes, self.k_pr, self.k_dc = int(num_classes), int(k_pr), int(k_dc)
        self.fid, self.per_class, self.inclusive, self.block_size = fid, per_class, inclusive, block_size
        for side in ("fake", "real"):
            self.add_state(f"{side}_features", [], dist_reduce_fx="cat")
            self.add_state(f"{side}_labels", [], dist_reduce_fx="cat")
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_reference(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Labelled real features (not a state: identical on every rank, survives `reset`)."""
        features, labels = torch.as_tensor(features).detach().float().cpu(), torch.as_tensor(labels).long().cpu()
        if features.dim() != 2 or labels.shape != (features.shape[0],):
            raise DataError(f"reference features (N, D) and labels (N,) disagree: {tuple(features.shape)}, "
                            f"{tuple(labels.shape)}")
        self._reference = (features, labels)

    def update(self, features: torch.Tensor, labels: torch.Tensor, real: bool = False) -> None:
        labels = torch.as_tensor(labels, device=features.device).long().flatten()
        if labels.shape[0] != features.shape[0]:
            raise DataError(f"{features.shape[0]} features but {labels.shape[0]} labels")
        side = "real" if real else "fake"
        getattr(self, f"{side}_features").append(features.detach().float().flatten(1))
        getattr(self, f"{side}_labels").append(labels)

    def _real(self) -> tuple[torch.Tensor, torch.Tensor]:
        if cat_count(self.real_labels):
            return cat_state(self.real_features), cat_state(self.real_labels)
        if self._reference is None:
            raise DataError("class-wise metrics need labelled real features: set_reference(features, labels) "
                            "or update(features, labels, real=True)")
        return self._reference

    def compute(self) -> dict[str, float]:
        fake, fake_y = cat_state(self.fake_features), cat_state(self.fake_labels)
        if fake is None:
            raise DataError("class-wise metrics have no samples")
        real, real_y = self._real()
        real, real_y = real.to(fake.device), real_y.to(fake.device)
        need = max(self.k_pr, self.k_dc) + 1
        names = list(_MANIFOLD) + (["fid"] if self.fid else []) + self.tail_keys
        sums, counts = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        out: dict[str, float] = {}
        evaluated = 0
        for c in range(self.num_classes):
            r, f = real[real_y == c], fake[fake_y == c]
            if r.shape[0] < need or f.shape[0] < need:
                continue
            evaluated += 1
            values = prdc(r, f, self.k_pr, self.k_dc, inclusive=self.inclusive, block_size=self.block_size)
            if self.fid:
                values["fid"] = frechet_distance_features(r, f)
            if self.tail_keys:
                values.update(tail_manifold(r, f, self.k_pr, self.k_dc, self.tail_fraction,
                                            inclusive=self.inclusive, block_size=self.block_size))
            for name in names:
                if not math.isnan(values[name]):
                    sums[name] += values[name]
                    counts[name] += 1
                if self.per_class:
                    out[f"class/{c}/{name}"] = values[name]
        for name in names:
            out[f"classwise/{name}_mean"] = sums[name] / counts[name] if counts[name] else math.nan
        out["classwise/num_classes"] = float(evaluated)
        return out
