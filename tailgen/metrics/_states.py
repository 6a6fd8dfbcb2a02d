"""Helpers for torchmetrics ``cat`` states (a list of tensors before sync, one tensor after)."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from tailgen.utils import DataError


def cat_state(state) -> torch.Tensor | None:
    """A ``cat`` state as one tensor, or None when empty."""
    if isinstance(state, torch.Tensor):
        return state if state.numel() else None
    return torch.cat(state) if len(state) else None


def cat_count(state) -> int:
    t = cat_state(state)
    return 0 if t is None else t.shape[0]


class GatherSafeMetric(Metric):
    """A Metric whose ``cat`` states may be empty on some ranks (e.g. fewer samples than ranks).

    torchmetrics replaces an empty list state by a 1-D float ``tensor([])`` before the all-gather, which cannot
    be gathered with other ranks' (n, d) features or long labels (the process aborts). Before the gather, ranks
    exchange the trailing shape/dtype of their non-empty ``cat`` states (``all_gather_object``) and empty ranks
    contribute a correctly shaped (0, ...) tensor instead.
    """

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        import torch.distributed as dist

        group = process_group or self.process_group
        cat_attrs = [a for a, fx in self._reductions.items() if fx is dim_zero_cat]
        local = {}
        for attr in cat_attrs:
            t = cat_state(getattr(self, attr))
            if t is not None:
                local[attr] = (tuple(t.shape[1:]), str(t.dtype).replace("torch.", ""))
        infos: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(infos, local, group=group)
        for attr in cat_attrs:
            if cat_state(getattr(self, attr)) is None:
                known = next((info[attr] for info in infos if attr in info), None)
                if known is not None:
                    empty = torch.zeros((0, *known[0]), dtype=getattr(torch, known[1]), device=self.device)
                    setattr(self, attr, [empty])
        if dist_sync_fn is None:
            super()._sync_dist(process_group=process_group)
        else:
            super()._sync_dist(dist_sync_fn, process_group=process_group)


class FeatureSetMetric(GatherSafeMetric):
    """Base of metrics over two feature sets: generated (``fake_features``) and real (``real_features``, or a
    fixed reference set with ``set_reference_features``). Both are ``cat`` states, gathered across ranks."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("fake_features", [], dist_reduce_fx="cat")
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self._reference: torch.Tensor | None = None

    def set_reference_features(self, features) -> None:
        self._reference = torch.as_tensor(features).detach().float().cpu()

    def feature_sets(self, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(real, fake)`` features on the fake side's device: gathered real features, else the reference.
        ``what`` names the metric in the error raised when either side is missing."""
        fake = cat_state(self.fake_features)
        real = cat_state(self.real_features) if cat_count(self.real_features) else self._reference
        if fake is None or real is None:
            raise DataError(f"{what} needs fake features and real ones "
                            "(set_reference_features(...) or update(x, real=True))")
        return real.to(fake.device), fake

    def update(self, features: torch.Tensor, real: bool = False) -> None:
        (self.real_features if real else self.fake_features).append(features.detach().float().flatten(1))
