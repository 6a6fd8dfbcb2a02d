"""Self-guided minority guidance (Um & Ye, "Self-Guided Generation of Minority Samples Using Diffusion Models",
ECCV 2024, arXiv 2407.11555; methods.md §3.3). Training-free: the guidance signal is the model's own
reconstruction error, differentiated through the denoiser.

Minority score of x_t (paper Sec. 3, the Tweedie reconstruction loss of Um, Lee & Ye ICLR 2024, arXiv 2301.12334,
Eq. 4, evaluated on the current x0_hat instead of a real image)::

    x0_hat   = x0_hat(x_t, t)                                   (Tweedie, methods.md §0; with gradient, not clipped)
    x_p      = sqrt(abar_p) sg[x0_hat] + sqrt(1 - abar_p) z,  z ~ N(0, I)   (re-noised to the fixed level p)
    x0_tilde = sg[x0_hat(x_p, p)]                               (one more network call, no gradient)
    L(x_t)   = (1/M) sum_m d(x0_hat, x0_tilde_m),  d = L2 norm ||.||_2   (LPIPS in the paper; no LPIPS weights offline)

A sample the model reconstructs badly after re-noising lies in a low-density (minority) region, so the guidance
*ascends* L::

    g = grad_{x_t} L,  g <- g / max_j |g_j| per sample (``normalize``),   mu' = mu + w Sigma g   (DDPM, H2)

i.e. ADM's mean shift with the model variance (the reference code's ``mg_scale_type='var'``); the score form
is used on DDIM / DPM-Solver (``form='auto'``). The re-noising level is the respaced index
p = floor(K * renoise_ratio) of the K-step chain (reference ``p_ratio = 0.8``): a fixed level, so on the first
(1 - ratio) K steps x_p is *less* noisy than x_t, as in the reference. Fresh noise z comes from the noise source's
``extra`` stream (one draw per Monte-Carlo sample and active step), which leaves the sampler's own noise alone.
With ``normalize`` the result does not depend on whether d is the norm or the squared norm (they differ by a
per-sample factor 2 ||.||), so w alone sets the step: at most w * Sigma per pixel.

Reference settings (github.com/soobin-um/sg-minority, ``image_sample.py``; 250 DDPM steps, learned Sigma):
CelebA / LSUN ``mg_scale`` 0.4 every 5th step (``inter_rate`` 5); ImageNet-64 (class-conditional ADM)
``mg_scale`` 0.2 every 2nd step; M = 1, not clipped, normalised. Here ``every`` counts sampler steps from the
noisiest (step 0, k, 2k, ...), the reference counts respaced indices (i % k == 0): the same rate, shifted.
Since sum_i Sigma_i barely depends on the number of steps, the drift per unit w depends on the *share* of steps
guided (1/every), not on the step count: ImageNet-64's 0.2 at every 2nd step ~ 0.1 at every step.

Cost per active step: one denoiser forward with graph + one backward (through x0_hat(x_t)) + M forwards without
graph (x0_tilde): about 3 + M network-forward equivalents on top of the step's own call (a backward ~ 2
forwards), so a sampler step costs ~(1 + (3 + M) / every) times the unguided step (M = 1, every = 2: ~3x).
Measured (Fashion-MNIST, configs/fashion/sg_minority.yaml, DDPM-50, one thread): 955 ms CPU per sample vs 431
unguided and 699 with ADM-G (2.2x unguided; the backward costs less than two forwards).
"""

from __future__ import annotations


import torch
from torch import Tensor

from tailgen.guidance.base import GradientGuidance, StepContext, denoised_gradient, max_normalized
from tailgen.utils import ConfigError


class SelfGuidedMinorityGuidance(GradientGuidance):
    """Ascent on the self-reconstruction error of x0_hat (see the module docstring for the equations).

    Args:
        renoise_ratio: re-noising level as a share of the respaced chain, p = floor(K * ratio), in (0, 1)
            (reference ``p_ratio`` 0.8).
        num_noise: Monte-Carlo re-noisings M per active step (reference ``num_mc_samples`` 1); each costs one
            network forward.
        normalize: divide the gradient by its per-sample max |entry| (reference ``use_normed_grad``).
        scale: w (reference ``mg_scale``); **kwargs: form, max_norm and the window: see ``GradientGuidance``
            (``every`` is the reference ``inter_rate``).
    """

    def __init__(self, scale: float = 0.2, renoise_ratio: float = 0.8, num_noise: int = 1, normalize: bool = True,
                 **kwargs):
        super().__init__(scale=scale, **kwargs)
        name = type(self).__name__
        if not 0.0 < renoise_ratio < 1.0:
            raise ConfigError(f"{name}: renoise_ratio must lie in (0, 1) (reference 0.8), got {renoise_ratio}")
        if num_noise < 1:
            raise ConfigError(f"{name}: num_noise must be >= 1, got {num_noise}")
        self.renoise_ratio, self.num_noise, self.normalize = float(renoise_ratio), int(num_noise), bool(normalize)

    def renoise_index(self, num_steps: int) -> int:
        """Respaced index p = floor(K * renoise_ratio) of the re-noised copy."""
        return min(int(num_steps * self.renoise_ratio), num_steps - 1)

    def minority_score(self, ctx: StepContext, x0: Tensor) -> Tensor:
        """L per sample [B]: mean over M re-noisings of ||x0 - sg[x0_hat(q_sample(sg[x0], p))]||_2
        (differentiable in ``x0`` only)."""
        if ctx.noise is None:
            raise ConfigError(f"{type(self).__name__} needs the sampler's noise source (ctx.noise) for re-noising")
        p, process = self.renoise_index(ctx.process.num_steps), ctx.process
        total = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        for _ in range(self.num_noise):
            with torch.no_grad():
                x_p = process.q_sample(x0.detach(), p, ctx.noise.extra(x0).to(x0))
                x0_tilde = process.x0_from_eps(x_p, p, ctx.denoiser(x_p, p, ctx.labels).eps.to(x0))
            total = total + (x0 - x0_tilde).flatten(1).norm(dim=1)
        return total / self.num_noise

    def direction(self, ctx: StepContext) -> Tensor:
        g = denoised_gradient(ctx, lambda x0: self.minority_score(ctx, x0))
        return max_normalized(g) if self.normalize else g
