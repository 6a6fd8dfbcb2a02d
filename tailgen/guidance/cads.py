"""CADS: condition-annealed sampling (Sadat, Buhmann, Bradley, Hilliges & Weber, "CADS: Unleashing the Diversity
of Diffusion Models through Condition-Annealed Sampling", ICLR 2024, arXiv 2310.17347, §3).

CADS adds scheduled Gaussian noise to the conditioning signal y the network sees -- here the class embedding
``label_emb(y)`` that an ADM UNet (or the toy denoiser) adds to its time embedding -- strong at high noise and
none at low noise, so early steps explore beyond the class's dominant modes and late steps still honour the class::

    y_hat  = sqrt(gamma(t)) y + s sqrt(1 - gamma(t)) n,        n ~ N(0, I)   (fresh every step)       (paper Eq. 3)

    gamma(t) = 1                          t <= tau1
               (tau2 - t) / (tau2 - tau1)  tau1 < t < tau2                                             (paper Eq. 4)
               0                          t >= tau2                  (t = diffusion time t/T, 1 = pure noise)

    y_rescaled = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)                                 (paper Eq. 5)
    y_final    = psi y_rescaled + (1 - psi) y_hat                                                       (paper Eq. 6)

The rescaling returns the noisy condition to the clean condition's statistics (the paper: large noise otherwise
makes sampling diverge); psi = 1 uses it fully. Mean and std are taken per sample over the embedding dimensions,
so a sample does not depend on its batch (public ports such as sd-webui-cads pool them over the whole batch). With
psi = 1 and gamma = 0 the condition is a random vector with y's mean and std whatever s > 0; s sets the
signal-to-noise ratio of the condition in between.

tailgen's mapping: s = ``scale`` x schedule weight (the shared strength; scale 0 turns CADS off); gamma(t) is
CADS's own annealing, on top of the shared window (``t_min``/``t_max``, ``every``). CADS is *inactive* where
gamma = 1 (t <= tau1): the network then gets the labels as usual, bit for bit. n comes from the noise source's
``extra`` stream (per-sample generators), so the main sampler noise is unchanged. It runs at hook Hc
(``guide_condition``) before the step's network call; CFG's unconditional branch keeps its clean null label, and
guidances that make their own network calls (``PredictedImageGradient``) use the clean labels. The paper's
optional "dynamic CFG" (scaling the CFG weight by gamma(t)) is not part of this class.

Defaults tau1 = 0.6, tau2 = 0.9, s = 0.25, psi = 1 are the settings methods.md §3.4 reports from a secondary note
(marked unverified there); the paper tunes them per task. Costs nothing beyond one small noise draw per step.
"""

from __future__ import annotations

from torch import Tensor

from tailgen.guidance.base import Guidance, StepContext
from tailgen.utils import ConfigError

import torch


def cads_gamma(tau: float, tau1: float, tau2: float) -> float:
    """The piecewise-linear annealing schedule gamma(tau) of CADS (paper Eq. 4): 1 below tau1, 0 above tau2."""
    if tau <= tau1:
        return 1.0
    if tau >= tau2:
        return 0.0
    return (tau2 - tau) / (tau2 - tau1)


def rescale_condition(noisy: Tensor, clean: Tensor, psi: float) -> Tensor:
    """Paper Eqs. 5-6, per sample over the feature dimensions: standardise ``noisy`` to ``clean``'s mean/std,
    then mix ``psi * rescaled + (1 - psi) * noisy``."""
    dims = tuple(range(1, noisy.dim()))
    rescaled = ((noisy - noisy.mean(dims, keepdim=True)) / noisy.std(dims, keepdim=True).clamp_min(1e-12)
                * clean.std(dims, keepdim=True) + clean.mean(dims, keepdim=True))
    return psi * rescaled + (1.0 - psi) * noisy


class CADS(Guidance):
    """Condition-annealed sampling: annealed Gaussian noise on the class embedding (see the module docstring).

    Args:
        scale: noise scale s of the condition (paper Eq. 3); 0 = off.
        tau1, tau2: gamma = 1 (clean condition) for t/T <= tau1, 0 (pure noise condition) for t/T >= tau2,
            linear in between; 0 <= tau1 < tau2 <= 1.
        psi: mixing factor of the rescaled condition (paper Eq. 6), in [0, 1].
        **kwargs: t_min, t_max, every, schedule, start, stop: see ``Guidance`` (the shared window and strength schedule).
    """

    def __init__(self, scale: float = 0.25, tau1: float = 0.6, tau2: float = 0.9, psi: float = 1.0, **kwargs):
        super().__init__(scale=scale, **kwargs)
        if not 0.0 <= tau1 < tau2 <= 1.0:
            raise ConfigError(f"CADS: need 0 <= tau1 < tau2 <= 1, got tau1={tau1}, tau2={tau2}")
        if not 0.0 <= psi <= 1.0:
            raise ConfigError(f"CADS: psi must lie in [0, 1], got {psi}")
        if scale < 0:
            raise ConfigError(f"CADS: scale (the condition noise scale s) must be >= 0, got {scale}")
        self.tau1, self.tau2, self.psi = float(tau1), float(tau2), float(psi)

    def gamma(self, tau: float) -> float:
        return cads_gamma(tau, self.tau1, self.tau2)

    def active(self, ctx: StepContext) -> bool:
        """Also off where gamma = 1 (the clean condition): the network gets its labels unchanged."""
        return super().active(ctx) and self.gamma(ctx.tau) < 1.0

    def guide_condition(self, ctx: StepContext, emb: Tensor, w: float | Tensor) -> Tensor:
        gamma = self.gamma(ctx.tau)
        if isinstance(w, Tensor):
            w = w.reshape(-1, *([1] * (emb.dim() - 1))).to(emb)
        n = ctx.noise.extra(emb).to(emb) if ctx.noise is not None else torch.randn_like(emb)
        noisy = gamma ** 0.5 * emb + w * (1.0 - gamma) ** 0.5 * n
        return rescale_condition(noisy, emb, self.psi)
