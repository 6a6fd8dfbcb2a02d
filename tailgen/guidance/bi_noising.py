"""Bi-noising: the unconditional model as a regulariser of a conditional sampler (Mei, Nair & Patel, "Bi-Noising
Diffusion: Towards Conditional Diffusion Models with Generative Restoration Priors", arXiv 2212.07352, 2022;
methods.md §7).

The paper's claim (abstract): the conditional model's samples drift from the data manifold step by step; a pretrained
*unconditional* model, applied at each sampling step, brings them back. tailgen's reading of the step (methods.md §7,
the paper's algorithm itself was not readable: [unverified] until checked against it) -- after the conditional step
has produced x_{i-1}^c (hook H5, ``after_step``)::

    x~_i    = sqrt(1 - beta_i) x_{i-1}^c + sqrt(beta_i) z1,              z1 ~ N(0, I)   forward re-noise q(x_i | x_{i-1})
    x0_u    = x0_hat_u(x~_i) = (x~_i - sqrt(1 - abar_i) eps_u(x~_i)) / sqrt(abar_i)   (clipped to [-1, 1] if asked)
    x_{i-1}^u = c1_i x0_u + c2_i x~_i + Sigma_u^{1/2} z2,                z2 ~ N(0, I)   the unconditional DDPM step
                                                                                        (no noise at i = 0)
    x_{i-1} = x_{i-1}^c + w (x_{i-1}^u - x_{i-1}^c)

with beta_i, abar_i, c1_i, c2_i the (respaced) process's coefficients at the step's index i (``betas``,
``posterior_mean_coef1/2``), Sigma_u the unconditional model's learned variance (IDDPM) or the process's fixed one.
w = 1 is the paper's rule (the unconditional step replaces the conditional output); 0 < w < 1 interpolates
(tailgen's strength knob, w = ``scale`` x schedule weight); w = 0 is off. When the unconditional model is exact,
the pair (re-noise, reverse step) is a Markov kernel that leaves the unconditional marginal p_u(x_{i-1}) invariant
and pulls any other distribution towards it (tests/test_guidance_bi_noising.py checks both in closed form).

The unconditional eps comes from ``ctx.uncond`` (``model.unconditional``, e.g. the official 256x256 uncond model)
or, with ``null_label``, from the conditional network called with that label (a model trained with label dropout;
10 for ``fashion_diffusion``). z1 and z2 come from the noise source's ``extra`` stream (both drawn on every active
step), so the sampler's own noise is unchanged. The window knobs choose the steps (the demo's ``binoising_step``);
each active step costs one more network call. Works after any sampler's update (DDPM as in the paper; on DDIM /
DPM-Solver the re-noising adds the stochasticity of one DDPM step).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tailgen.guidance.base import Guidance, StepContext, UnconditionalPath
from tailgen.utils import ConfigError


class BiNoising(UnconditionalPath, Guidance):
    """Re-noise the conditional step's output and take the unconditional model's reverse step (H5; see the module
    docstring for the equations).

    Args:
        scale: w, how far x_{i-1} moves to the unconditional step's result (1 = the paper's replacement, 0 = off;
            must be >= 0; above 1 extrapolates past it).
        null_label: label of the "no class" token of a conditional network trained with label dropout, or None to
            use ``model.unconditional``.
        clip_denoised: clamp the unconditional x0_hat to [-1, 1] (as the sampler does by default).
        **kwargs: t_min, t_max, every, schedule, start, stop: the shared window and schedule of ``Guidance``.
    """

    no_uncond = ("BiNoising needs an unconditional model: set model.init_args.unconditional (e.g. preset "
                 "256x256_diffusion_uncond) or the guidance's null_label (10 for fashion_diffusion)")

    def __init__(self, scale: float = 1.0, null_label: Optional[int] = None, clip_denoised: bool = True, **kwargs):
        super().__init__(scale=scale, **kwargs)
        if scale < 0:
            raise ConfigError(f"BiNoising: scale must be >= 0 (1 = the paper's rule, 0 = off), got {scale}")
        self.set_null_label(null_label)
        self.clip_denoised = bool(clip_denoised)

    def after_step(self, ctx: StepContext, x_prev: Tensor, w: float | Tensor) -> Tensor:
        if not isinstance(w, Tensor) and w == 0.0:
            return x_prev  # a zero schedule weight: no network call
        p, i = ctx.process, ctx.i
        z1 = ctx.noise.extra(x_prev) if ctx.noise is not None else torch.randn_like(x_prev)
        z2 = ctx.noise.extra(x_prev) if ctx.noise is not None else torch.randn_like(x_prev)
        beta = p.coef("betas", i, x_prev)
        x_re = torch.sqrt(1 - beta) * x_prev + torch.sqrt(beta) * z1  # q(x_i | x_{i-1})
        pred = self.unconditional(ctx, x_re)
        x0 = p.x0_from_eps(x_re, i, pred.eps.to(x_re.dtype))
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        x_u = p.posterior_mean(x0, x_re, i)
        if i > 0:
            log_var = pred.log_var if pred.log_var is not None else p.model_log_variance(i, None, x_re)
            x_u = x_u + torch.exp(0.5 * log_var.to(x_re.dtype)) * z2
        return x_prev + w * (x_u - x_prev)
