"""DDIM sampler (Song et al. 2021, Eq. 12) for any eta."""

from __future__ import annotations

import torch

from tailgen.sampling.common import Callback, GuidanceArg, Loop, check_eta


@torch.no_grad()
def sample_ddim(denoiser, x: torch.Tensor, process, labels: torch.Tensor | None = None, *, eta: float = 0.0,
                guidance: GuidanceArg = None, noise=None, clip_denoised: bool = True, callback: Callback = None,
                progress: bool = False, classifier=None, uncond=None, model_kwargs: dict | None = None) -> torch.Tensor:
    """``x_{i-1} = sqrt(abar') x0_hat + sqrt(1 - abar' - s^2) eps + s z`` with
    ``s = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')`` and abar' = abar_{i-1} (1 past the end).

    x0_hat is clipped and guided by the shared routine; eps is re-derived from it (ADM ``ddim_sample`` with
    ``condition_score``). One noise tensor is drawn every step, even at eta = 0 (then multiplied by 0), so replayed
    reference noise reproduces guided-diffusion's ``ddim_sample_loop``.
    """
    eta = check_eta(eta)
    loop = Loop("ddim", denoiser, process, labels, guidance=guidance, noise=noise, classifier=classifier,
                uncond=uncond, model_kwargs=model_kwargs, progress=progress)
    for ctx in loop.steps(x):
        i = ctx.i
        # Guided prediction: H3, network, H1, clipped x0_hat, score-form gradients, H4; eps from x0_hat
        pred = loop.stack.predict(ctx, clip_denoised)
        # Noise level of the step, in float32 as the reference
        abar, abar_prev = process.alpha_bar(i, pred.x), process.alpha_bar_prev(i, pred.x)
        s = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        # One noise draw per step, consumed even when eta = 0 or i = 0
        z = loop.noise.step(pred.x)
        # DDIM update (Eq. 12)
        x = pred.x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - s**2) * pred.eps
        if i > 0:
            x = x + s * z
        x = loop.finish_step(ctx, x, pred.x0, callback)
    return x
