"""Layer 4: samplers as short loops sharing one guided prediction routine (``GuidanceStack.predict``).

Every sampler is ``sample_<name>(run, x, process, labels=None, *, <solver options>)`` with ``run`` a
:class:`SamplingRun` (denoiser, guidance, noise, noisy classifier, unconditional model, callback, ...)::

    run = SamplingRun(ADMDenoiser(unet, process), guidance=[ClassifierGuidance(scale=2.0)],
                      noisy_classifier=NoisyClassifier(classifier_net, process), noise=SeededNoise(seeds))
    x = sample_ddim(run, run.noise.initial(shape), process, labels, eta=0.5)   # or sample("ddim", run, ...)
"""

from __future__ import annotations

import torch

from tailgen.sampling.ddim import sample_ddim
from tailgen.sampling.ddpm import sample_ddpm
from tailgen.sampling.dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde
from tailgen.sampling.run import SamplingRun
from tailgen.utils.errors import ConfigError

SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde}


def sample(name: str, run: SamplingRun, x: torch.Tensor, process, labels: torch.Tensor | None = None,
           **options) -> torch.Tensor:
    """Run the sampler called ``name`` (``ddpm``, ``ddim``, ``dpmpp_2m``, ``dpmpp_2m_sde``); ``options`` as that
    sampler takes (``eta`` for ddim, ``lower_order_final`` for the DPM-Solvers)."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    if "eta" in options and name != "ddim":
        eta = options.pop("eta")
        if eta not in (None, 0, 0.0):
            raise ConfigError(f"eta={eta} only applies to the ddim sampler, not {name!r}")
    return SAMPLERS[name](run, x, process, labels, **options)


__all__ = ["SAMPLERS", "SamplingRun", "sample", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde"]
