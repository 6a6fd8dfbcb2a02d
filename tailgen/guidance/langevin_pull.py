"""A pull toward the predicted image that keeps the sampling temperature: a Langevin corrector on x_t.

**This is tailgen's formulation, not the target paper's** (arXiv 2606.13347 publishes no equations; methods.md §4.1
(f)-(h) are our literal readings of "guide toward the predicted real image", and docs/toy_results.md shows that the
plain pulls (f) and (h) lower the sampling temperature and erase rare modes).

Why the plain pull lowers the temperature. By Tweedie, x0_hat(x_t) = E[x0 | x_t] and the score of the noisy
marginal is

    grad log p_t(x) = (sqrt(abar_t) x0_hat(x) - x) / (1 - abar_t) = -eps_hat(x) / sqrt(1 - abar_t),

so a pull x <- x + eta (sqrt(abar_t) x0_hat - x) is a gradient-ascent step on log p_t with step
delta = eta (1 - abar_t): repeated, it climbs to the modes of p_t (temperature -> 0). Adding the diffusion term
of Langevin dynamics, sqrt(2 delta) z, turns it into a Langevin step whose stationary law is p_t itself (as
delta -> 0): samples are still moved toward where p_t puts its mass -- back from where a guidance or a model error
pushed them -- but the spread of p_t is kept (the predictor-corrector idea of Song et al., ICLR 2021, Alg. 2-3,
with the corrector's score taken from x0_hat). tailgen's step (hook H3, on x_t before the step's network call)::

    eps_hat = eps_theta(x_t, y)                                             (one extra network call)
    m       = ||eps_hat||^2 / D                                             (per sample)
    x_t'    = x_t + eta (sqrt(abar_t) x0_hat - x_t) + sqrt(eta (1 - abar_t) (2 - eta m)) z
            = x_t - eta sqrt(1 - abar_t) eps_hat + sqrt(eta (1 - abar_t) (2 - eta m)) z,     z ~ N(0, I)

The noise variance eta (1 - abar_t) (2 - eta m) is Langevin's 2 delta less a second-order term that makes one
step *exactly* variance-preserving for Gaussian data, whatever eta: for x0 ~ N(0, s^2 I) and the exact model,
x_t ~ N(0, v I) with v = abar_t s^2 + 1 - abar_t, eps_hat = sqrt(1 - abar_t) x_t / v, so with q = (1 - abar_t) / v
(= E m) the step is x' = (1 - eta q) x_t + c z and

    Var x' = (1 - eta q)^2 v + (1 - abar_t) eta (2 - eta q) = v        (plain Langevin, c^2 = 2 delta: v (1 + eta^2 q^2);
                                                                        the pull alone: (1 - eta q)^2 v < v).

For anisotropic Gaussian data (per-dimension q_i) the total variance (trace) is preserved exactly and each
dimension to O(eta^2). tests/test_guidance_langevin_pull.py checks both on the closed-form Gaussian, one step and
through a whole DDPM run, against the plain pull (f), whose variance shrinks.

Step size: Song et al. set the corrector step by a signal-to-noise ratio r, delta = 2 (r ||z|| / ||score||)^2; with
||score||^2 = D m / (1 - abar_t) that is eta = 2 r^2 / m, so their CIFAR-10 r = 0.16 is eta ~ 0.05 here. On the
Fashion model, eta = 0.1 and 0.5 with ADM-G s = 1 gave visibly smoother, higher-contrast samples (20 samples,
configs/fashion/langevin_pull.yaml): the corrector samples the *unguided* conditional p_t and so partly undoes
ADM-G's sharpening, and the learned score is not exact; whether it helps is for the study to measure.

It uses the conditional network's own eps (not CFG- or gradient-guided eps) and the unclipped x0_hat (the score);
z comes from the noise source's ``extra`` stream. Cost: one extra network call per active step (use ``every``,
``t_min``/``t_max`` to spend it where it matters). Works with every sampler (it adds noise, so a deterministic
DDIM run becomes stochastic).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tailgen.guidance.base import Guidance, StepContext
from tailgen.utils import ConfigError


class LangevinPull(Guidance):
    """Pull x_t toward sqrt(abar_t) x0_hat with the matching Langevin noise (temperature kept; see the module
    docstring). tailgen's formulation, not the paper's.

    Args:
        scale: eta in [0, 1], the step as a fraction of the noise variance (delta = eta (1 - abar_t)); 0 = off.
        **kwargs: t_min, t_max, every, schedule, start, stop: see ``Guidance``.
    """

    def __init__(self, scale: float = 0.1, **kwargs):
        if not 0.0 <= scale <= 1.0:
            raise ConfigError(f"LangevinPull: scale (the step size eta) must lie in [0, 1], got {scale}")
        super().__init__(scale=scale, **kwargs)

    def before_model(self, ctx: StepContext, x: Tensor, w: float | Tensor) -> Tensor:
        if ctx.noise is None:
            raise ConfigError("LangevinPull needs the sampler's noise source (ctx.noise)")
        one_minus_abar = 1.0 - float(ctx.process.alphas_cumprod[ctx.i])
        eps = ctx.denoiser(x, ctx.i, ctx.labels).eps.to(x.dtype)
        m = eps.pow(2).flatten(1).mean(1).reshape(-1, *([1] * (x.dim() - 1)))
        var = (w * one_minus_abar * (2.0 - w * m)).clamp_min(0.0)
        z = ctx.noise.extra(x).to(x)
        return x - w * one_minus_abar ** 0.5 * eps + torch.sqrt(var) * z
