"""Noise schedules and timestep respacing as pure float64 functions.

Everything here follows openai/guided-diffusion (ADM) / improved-diffusion (IDDPM) exactly, so a model trained
there samples identically here:

* linear schedule (Ho et al. 2020, scaled to any step count as ADM does) and cosine schedule (Nichol & Dhariwal
  2021, Eq. 17, with beta clipped at 0.999);
* respacing strings ``"250"``, ``"ddim25"`` and sectioned ``"10,10,10"`` (IDDPM ``space_timesteps``), with Python's
  round-half-to-even and the reference's repeated float addition of the stride;
* the respaced betas ``beta'_j = 1 - abar[t_j] / abar[t_{j-1}]`` over the kept steps.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from tailgen.utils.errors import ConfigError

SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous ``alpha_bar(s)``, s in [0, 1], into ``num_steps`` betas (float64).

    ``beta_i = min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), max_beta)``.
    """
    betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Betas (float64, shape [num_steps]) of the named schedule: ``"linear"`` or ``"cosine"``."""
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ConfigError(f"diffusion_steps must be a positive integer, got {num_steps!r}")
    if name == "linear":
        # Ho et al. 2020 used 1e-4 .. 0.02 for 1000 steps; scale so any step count gives the same process.
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ConfigError(f"unknown noise_schedule {name!r}: use one of {', '.join(SCHEDULES)}")


def _parse_int(text: str, spec: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(
            f"malformed timestep_respacing {spec!r}: expected '' (all steps), a count like '250', "
            f"'ddim25' or comma-separated section counts like '10,10,10'"
        ) from None


def space_timesteps(num_steps: int, spec: str | int | Sequence[int]) -> list[int]:
    """Original timesteps kept by a respacing spec, sorted ascending.

    * ``""``: all ``num_steps`` steps.
    * ``"K"`` (or an int): K steps evenly spread over [0, N-1], ends included, rounded half-to-even.
    * ``"ddimK"``: ``range(0, N, s)`` for the smallest integer stride s giving exactly K steps (DDIM paper stride).
    * ``"a,b,c"`` (or a list): N split into equal sections (the first ``N % len`` sections one step longer),
      each section spaced like ``"K"``.
    """
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        counts = [int(spec)]
    elif isinstance(spec, str):
        text = spec.strip()
        if text == "":
            return list(range(num_steps))
        if text.startswith("ddim"):
            want = _parse_int(text[len("ddim"):], spec)
            for stride in range(1, num_steps + 1):
                if len(range(0, num_steps, stride)) == want:
                    return list(range(0, num_steps, stride))
            counts = {len(range(0, num_steps, stride)) for stride in range(1, num_steps + 1)}
            nearest = min(counts, key=lambda c: (abs(c - want), c))
            plain = f"a plain count like '{want}'" if 1 <= want <= num_steps else f"a plain count <= {num_steps}"
            raise ConfigError(
                f"timestep_respacing {spec!r}: no integer stride gives exactly {want} of {num_steps} steps; "
                f"use 'ddim{nearest}' (the nearest count a stride gives) or {plain}"
            )
        counts = [_parse_int(part, spec) for part in text.split(",")]
    elif isinstance(spec, Sequence):
        counts = [int(c) for c in spec]
    else:
        raise ConfigError(f"timestep_respacing must be a string like '250' or 'ddim25', got {spec!r}")
    if not counts or any(c < 1 for c in counts):
        raise ConfigError(f"timestep_respacing {spec!r}: every section needs at least one step")

    size_per, extra = divmod(num_steps, len(counts))
    start, kept = 0, []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if count > size:
            raise ConfigError(
                f"timestep_respacing {spec!r} asks for {count} steps in a section of {size} "
                f"(diffusion_steps={num_steps}): use at most {size} steps there"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))  # Python round: half to even, as the reference
            position += stride  # repeated addition, as the reference
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Betas of the process restricted to the ``kept`` original steps: ``1 - abar[t_j] / abar[t_{j-1}]``."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    keep = set(int(t) for t in kept)
    new_betas, last = [], 1.0
    for t, abar in enumerate(alphas_cumprod):
        if t in keep:
            new_betas.append(1.0 - abar / last)
            last = abar
    return np.array(new_betas, dtype=np.float64)
