"""PPAP expert classifiers (Go et al., "Towards Practical Plug-and-Play Diffusion Models", CVPR 2023,
arXiv 2212.05973; methods.md §6): several noisy classifiers, each an expert for a range of timesteps, routed per
sample by the timestep the set is called with::

    logits(x_b, t_b) = f_k(x_b, t'_k)    for the one expert k with lo_k <= t_b <= hi_k          (every sample b)

with t'_k = t_b, or the expert's ``fixed_t`` for experts that never saw t (PPAP's experts take x only; a LoRA expert
on tailgen's clean classifier, trained at t = 0, is called with ``fixed_t = 0``). The ranges are over the timesteps
the networks receive (the original index 0..T-1), inclusive, sorted, contiguous, covering 0..T-1.

PPAP's split (``guided_diffusion/multi_expert_helper.py``): N experts, boundaries b_k = int(k T / N) (k = 0..N), and
t goes to the first k with b_k <= t <= b_{k+1}, so a boundary t belongs to the lower expert: expert 0 serves
[0, b_1], expert k >= 1 serves [b_k + 1, b_{k+1}] (``ppap_ranges``). PPAP routes a whole batch by its first
sample's t; here each sample goes to its own expert (the same result whenever a batch shares t, as in every sampler).

A batch that falls in one expert's range is a single call of that network with the timesteps exactly as given, so a
one-expert set is bit-identical to the bare classifier. A mixed batch is split by index and reassembled; the
gather / concatenate / permute is differentiable, so grad_x log p(y | x_t) reaches each sample through its own expert.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from tailgen.models.nn import as_timestep_tensor
from tailgen.utils import ConfigError


def ppap_ranges(num_experts: int, num_timesteps: int) -> list[tuple[int, int]]:
    """PPAP's equal split of 0..T-1 into ``num_experts`` inclusive ranges (boundary t to the lower expert)."""
    if num_experts < 1 or num_experts > num_timesteps:
        raise ConfigError(f"need 1 <= number of experts <= T = {num_timesteps}, got {num_experts}")
    bounds = [int(k * num_timesteps / num_experts) for k in range(num_experts + 1)]
    ranges = [(0 if k == 0 else bounds[k] + 1, min(bounds[k + 1], num_timesteps - 1)) for k in range(num_experts)]
    if any(lo > hi for lo, hi in ranges):
        raise ConfigError(f"{num_experts} experts over T = {num_timesteps} steps leave an expert without timesteps: "
                          "use fewer experts")
    return ranges


def check_ranges(t_ranges: Sequence[Sequence[int]], num_timesteps: Optional[int] = None,
                 key: str = "t_range") -> list[tuple[int, int]]:
    """Inclusive (lo, hi) ranges, sorted, contiguous, from 0 (to T - 1 when ``num_timesteps`` is given)."""
    ranges = []
    for k, r in enumerate(t_ranges):
        if len(r) != 2 or any(isinstance(v, bool) or int(v) != v for v in r) or not 0 <= r[0] <= r[1]:
            raise ConfigError(f"{key} of expert {k} must be [lo, hi] with integers 0 <= lo <= hi, got {list(r)}")
        ranges.append((int(r[0]), int(r[1])))
    if not ranges:
        raise ConfigError("a classifier expert set needs at least one expert")
    expected = 0
    for k, (lo, hi) in enumerate(ranges):
        if lo != expected:
            raise ConfigError(f"{key}s must be sorted and contiguous from 0: expert {k} starts at {lo}, expected "
                              f"{expected} (ranges {[list(r) for r in ranges]})")
        expected = hi + 1
    if num_timesteps is not None and expected != num_timesteps:
        raise ConfigError(f"{key}s must cover every timestep 0..{num_timesteps - 1}: they end at {expected - 1} "
                          f"(ranges {[list(r) for r in ranges]})")
    return ranges


class ClassifierExperts(nn.Module):
    """K classifier networks with the call signature of one: ``forward(x, timesteps) -> logits (B, C)``, each
    sample routed to the expert whose ``t_ranges`` entry holds its timestep (see the module docstring).

    Args:
        experts: the K networks (``net(x, timesteps) -> logits``), same number of classes.
        t_ranges: K inclusive (lo, hi) ranges of timesteps, sorted and contiguous from 0.
        fixed_t: per expert, None (call it with the sample's timesteps) or the timestep it is always called with.
    """

    def __init__(self, experts: Sequence[nn.Module], t_ranges: Sequence[Sequence[int]],
                 fixed_t: Optional[Sequence[Optional[int]]] = None):
        super().__init__()
        if len(experts) != len(t_ranges):
            raise ConfigError(f"{len(experts)} experts but {len(t_ranges)} t_ranges: give one range per expert")
        self.experts = nn.ModuleList(experts)
        self.t_ranges = check_ranges(t_ranges)
        self.fixed_t = list(fixed_t) if fixed_t is not None else [None] * len(experts)
        if len(self.fixed_t) != len(experts):
            raise ConfigError(f"{len(experts)} experts but {len(self.fixed_t)} fixed_t entries")
        self.register_buffer("_upper", torch.tensor([hi for _, hi in self.t_ranges], dtype=torch.float64),
                             persistent=False)

    def expert_index(self, timesteps: Tensor) -> Tensor:
        """[B] int64: the expert of each timestep (ConfigError for timesteps outside every range)."""
        t = timesteps.to(torch.float64)
        if len(t) and (t.min() < 0 or t.max() > self.t_ranges[-1][1]):
            bad = float(t[(t < 0) | (t > self.t_ranges[-1][1])][0])
            raise ConfigError(f"timestep {bad:g} lies outside every expert's t_range "
                              f"(0..{self.t_ranges[-1][1]}): the experts must cover the diffusion process")
        # ranges are contiguous integers: expert = number of upper bounds strictly below ceil(t)
        return torch.searchsorted(self._upper.to(t.device), torch.ceil(t), right=False)

    def _call(self, k: int, x: Tensor, timesteps) -> Tensor:
        t = timesteps if self.fixed_t[k] is None else torch.full((x.shape[0],), int(self.fixed_t[k]),
                                                                  dtype=torch.int64, device=x.device)
        return self.experts[k](x, t)

    def forward(self, x: Tensor, timesteps) -> Tensor:
        t = as_timestep_tensor(timesteps, x.shape[0], x.device)
        which = self.expert_index(t)
        used = torch.unique(which).tolist() or [0]
        if len(used) == 1:  # the whole batch in one range: one plain call, timesteps as given
            return self._call(used[0], x, timesteps)
        order, parts = [], []
        for k in used:
            idx = torch.nonzero(which == k).flatten()
            order.append(idx)
            parts.append(self._call(k, x[idx], t[idx]))
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(parts)[inverse]

    def extra_repr(self) -> str:
        return f"t_ranges={self.t_ranges}, fixed_t={self.fixed_t}"
