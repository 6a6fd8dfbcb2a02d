"""Injectable randomness for samplers.

A sampler never calls ``torch.randn`` itself: it asks a :class:`NoiseSource` for the initial x_T and for exactly one
x-shaped draw per step (``step``, consumed even where it is masked out, as the reference does). Guidances that need
their own randomness (re-noising) use ``extra``, a separate stream, so they never shift the sampler's noise.

* :class:`SeededNoise`: one CPU ``torch.Generator`` per sample (EDM's ``StackedRandomGenerator``): the sample for seed
  s is the same whatever the batch size, the batch position or the number of devices.
* :class:`ReplayNoise`: returns recorded tensors in order (the ADM fixtures record all of their noise).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from tailgen.utils.errors import ConfigError, SamplingError


@runtime_checkable
class NoiseSource(Protocol):
    def initial(self, shape: Sequence[int]) -> torch.Tensor:
        """x_T: a standard normal tensor of ``shape`` (batch first)."""

    def step(self, like: torch.Tensor) -> torch.Tensor:
        """The one standard normal draw of a sampler step, shaped like ``like``."""

    def extra(self, like: torch.Tensor) -> torch.Tensor:
        """A draw from a stream independent of ``initial``/``step`` (for guidances)."""


def _extra_seed(seed: int) -> int:
    """A 63-bit seed for the independent ``extra`` stream of ``seed`` (hash of (seed, 1))."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class SeededNoise:
    """Per-sample generators: ``initial``/``step`` from ``Generator().manual_seed(seed)``, ``extra`` from a hash.

    Draws happen on the CPU in float32, per sample, then are stacked and moved to ``device`` / ``dtype``.
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        if not seeds:
            raise ConfigError("SeededNoise needs at least one seed")
        for s in seeds:
            if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or not 0 <= s < 2**63:
                raise ConfigError(f"seeds must be integers in [0, 2**63), got {s!r}")
        self.seeds = [int(s) for s in seeds]
        self.device, self.dtype = torch.device(device), dtype
        self._main = [torch.Generator().manual_seed(s) for s in self.seeds]
        self._extra = [torch.Generator().manual_seed(_extra_seed(s)) for s in self.seeds]

    def _draw(self, gens: list[torch.Generator], shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
        shape = tuple(shape)
        if shape[0] != len(gens):
            raise SamplingError(f"noise for a batch of {shape[0]} requested from {len(gens)} seeds: pass one seed per sample")
        z = torch.stack([torch.randn(shape[1:], generator=g) for g in gens])
        return z.to(device=device or self.device, dtype=dtype or self.dtype)

    def initial(self, shape: Sequence[int]) -> torch.Tensor:
        return self._draw(self._main, shape)

    def step(self, like: torch.Tensor) -> torch.Tensor:
        return self._draw(self._main, like.shape, like.device, like.dtype)

    def extra(self, like: torch.Tensor) -> torch.Tensor:
        return self._draw(self._extra, like.shape, like.device, like.dtype)

    def __repr__(self) -> str:
        return f"SeededNoise({len(self.seeds)} seeds, device={self.device})"


class ReplayNoise:
    """Replays recorded noise: ``initial`` once, then ``steps[0], steps[1], ...`` (``extras`` likewise, if given)."""

    def __init__(self, initial: torch.Tensor, steps: Sequence[torch.Tensor] | torch.Tensor,
                 extras: Sequence[torch.Tensor] | torch.Tensor | None = None):
        self._initial = initial
        self._steps = list(steps)
        self._extras = None if extras is None else list(extras)
        self.used_steps = 0
        self.used_extras = 0

    def initial(self, shape: Sequence[int]) -> torch.Tensor:
        if tuple(shape) != tuple(self._initial.shape):
            raise SamplingError(f"recorded initial noise has shape {tuple(self._initial.shape)}, asked for {tuple(shape)}")
        return self._initial.clone()

    def step(self, like: torch.Tensor) -> torch.Tensor:
        if self.used_steps >= len(self._steps):
            raise SamplingError(
                f"ReplayNoise exhausted: all {len(self._steps)} recorded step draws are used; the sampler takes "
                f"more steps than were recorded"
            )
        z = self._steps[self.used_steps]
        self.used_steps += 1
        if z.shape != like.shape:
            raise SamplingError(f"recorded step noise {self.used_steps - 1} has shape {tuple(z.shape)}, x has {tuple(like.shape)}")
        return z.to(device=like.device, dtype=like.dtype)

    def extra(self, like: torch.Tensor) -> torch.Tensor:
        if self._extras is None or self.used_extras >= len(self._extras):
            have = 0 if self._extras is None else len(self._extras)
            raise SamplingError(f"ReplayNoise has no extra draw left ({have} recorded): record the guidance's extra noise too")
        z = self._extras[self.used_extras]
        self.used_extras += 1
        return z.to(device=like.device, dtype=like.dtype)

    @property
    def remaining(self) -> int:
        return len(self._steps) - self.used_steps


class TorchNoise:
    """Noise from one ``torch.Generator`` (or the global RNG): the fallback when a sampler gets no source.

    Not batch-size invariant; use :class:`SeededNoise` for reproducible per-sample results.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def initial(self, shape: Sequence[int]) -> torch.Tensor:
        device = self.generator.device if self.generator is not None else "cpu"
        return torch.randn(tuple(shape), generator=self.generator, device=device)

    def step(self, like: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=self.generator, device=self.generator.device).to(like)

    extra = step
