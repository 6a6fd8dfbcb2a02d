"""Helpers for torchmetrics ``cat`` states (a list of tensors before sync, one tensor after)."""

from __future__ import annotations

import torch


def cat_state(state) -> torch.Tensor | None:
    """A ``cat`` state as one tensor, or None when empty.

    Under DDP every rank should update at least once: torchmetrics substitutes a 1-D empty tensor for an empty
    list on one rank, which cannot be gathered with other ranks' 2-D features.
    """
    if isinstance(state, torch.Tensor):
        return state if state.numel() else None
    return torch.cat(state) if len(state) else None


def cat_count(state) -> int:
    t = cat_state(state)
    return 0 if t is None else t.shape[0]
