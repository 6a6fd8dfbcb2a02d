"""DDIM sampler (Song et al. 2021, Eq. 12) for any eta."""

from __future__ import annotations

import torch

from tailgen.sampling.run import SamplingRun
from tailgen.utils.errors import ConfigError


def check_eta(eta: float) -> float:
    if not 0.0 <= float(eta) <= 1.0:
        raise ConfigError(f"DDIM eta must be in [0, 1] (0 = deterministic, 1 = DDPM-like), got {eta}")
    return float(eta)


@torch.no_grad()
def sample_ddim(run: SamplingRun, x: torch.Tensor, process, labels: torch.Tensor | None = None, *,
                eta: float = 0.0) -> torch.Tensor:
    """``x_{i-1} = sqrt(abar') x0_hat + sqrt(1 - abar' - s^2) eps + s z`` with
    ``s = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')`` and abar' = abar_{i-1} (1 past the end).

    x0_hat is clipped and guided by the shared routine; eps is re-derived from it (ADM ``ddim_sample`` with
    ``condition_score``). One noise tensor is drawn every step, even at eta = 0 (then multiplied by 0), so replayed
    reference noise reproduces guided-diffusion's ``ddim_sample_loop``.
    """
    eta = check_eta(eta)
    for ctx in run.steps("ddim", x, process, labels):
        i = ctx.i
        # Guided prediction: H3, network, H1, clipped x0_hat, score-form gradients, H4; eps from x0_hat
        pred = run.predict(ctx)
        # Noise level of the step, in float32 as the reference
        abar, abar_prev = process.alpha_bar(i, pred.x), process.alpha_bar_prev(i, pred.x)
        s = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        # One noise draw per step, consumed even when eta = 0 or i = 0
        z = run.noise.step(pred.x)
        # DDIM update (Eq. 12)
        x = pred.x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - s**2) * pred.eps
        if i > 0:
            x = x + s * z
        # H5, non-finite check, callback
        x = run.finish(ctx, x, pred.x0)
    return x
