"""Ancestral DDPM sampler (Ho et al. 2020, Alg. 2) with a learned (IDDPM) or fixed variance."""

from __future__ import annotations

import torch

from tailgen.sampling.run import SamplingRun


@torch.no_grad()
def sample_ddpm(run: SamplingRun, x: torch.Tensor, process, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Sample ``x_{i-1} ~ N(mu + Sigma g, Sigma)`` for i = K-1 .. 0 from ``x`` = x at the first kept step.

    ``mu = c1 x0_hat + c2 x_t`` is the posterior mean q(x_{i-1} | x_i, x0_hat) at the (clipped, guided) x0_hat;
    ``Sigma`` is the learned IDDPM variance or the fixed one (``process.model_log_variance``); ``g`` is the sum of
    mean-form guidance gradients at x_t (ADM Alg. 1, ``condition_mean``). Each step draws exactly one noise tensor
    via ``run.noise.step`` (masked at i = 0), so replayed reference noise reproduces guided-diffusion's
    ``p_sample_loop``.
    """
    for ctx in run.steps("ddpm", x, process, labels):
        i = ctx.i
        # Guided prediction: H3, network, H1, clipped x0_hat, score-form gradients, H4
        pred = run.predict(ctx)
        x_t = pred.x
        # Posterior mean at x0_hat and the model variance
        mean = process.posterior_mean(pred.x0, x_t, i)
        log_var = pred.log_var if pred.log_var is not None else process.model_log_variance(i, None, x_t)
        # One noise draw per step, consumed even when masked (i = 0)
        z = run.noise.step(x_t)
        # H2 mean shift, gradient taken at x_t with the model's Sigma
        g = run.mean_gradient(ctx)
        if g is not None:
            mean = mean + process.model_variance(i, pred.log_var, x_t) * g.to(mean.dtype)
        # Ancestral step
        x = mean + torch.exp(0.5 * log_var) * z if i > 0 else mean
        # H5, non-finite check, callback
        x = run.finish(ctx, x, pred.x0)
    return x
