"""Layer 4: samplers as short loops sharing one guided prediction routine (``GuidanceStack.predict``)."""

from __future__ import annotations

import torch

from tailgen.sampling.ddim import sample_ddim
from tailgen.sampling.ddpm import sample_ddpm
from tailgen.sampling.dpm_solver import sample_dpmpp_2m
from tailgen.utils.errors import ConfigError

SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


def sample(name: str, denoiser, x: torch.Tensor, process, labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Run the sampler called ``name`` (``ddpm``, ``ddim``, ``dpmpp_2m``); ``kwargs`` as that sampler takes."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    if "eta" in kwargs and name != "ddim":
        eta = kwargs.pop("eta")
        if eta not in (None, 0, 0.0):
            raise ConfigError(f"eta={eta} only applies to the ddim sampler, not {name!r}")
    return SAMPLERS[name](denoiser, x, process, labels, **kwargs)


__all__ = ["SAMPLERS", "sample", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m"]
