"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598, Alg. 2; methods.md §2)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from tailgen.guidance.base import Guidance, StepContext, UnconditionalPath


class ClassifierFreeGuidance(UnconditionalPath, Guidance):
    """Classifier-free guidance at hook H1 (``guide_eps``)::

        eps <- (1 + w) eps(x_t, y) - w eps(x_t, null)

    w = ``scale`` (times the schedule weight); w = 0 is the conditional model, w = 1 is CompVis's g = 2.
    Paper: IN-64 best FID at w = 0.1 (1.55), IN-128 at w = 0.3. Samples ~ p(x | y) p^i(y | x)^w with the
    implicit classifier p^i(y | x) ~ p(x | y) / p(x).

    The unconditional eps comes from ``ctx.uncond(x, i)`` (a separate unconditional model provided by the
    module) or, when ``null_label`` is set, from the conditional network itself called with every label
    replaced by ``null_label`` (a model trained with label dropout); ``null_label`` wins when both exist.
    Only eps is guided: the learned variance stays the conditional model's. Costs one extra network call
    per active step.

    Args:
        scale: guidance weight w (>= 0 for the usual sharpening; negative w is allowed and anti-guides).
        null_label: label index of the "no class" token, or None to use the unconditional model.
        **kwargs: the window and schedule of ``Guidance`` (t_min, t_max, every, schedule, start, stop).
    """

    no_uncond = ("ClassifierFreeGuidance: CFG needs an unconditional path: set model.unconditional or the guidance's "
                 "null_label (model.unconditional: a separate unconditional model, e.g. the official 256x256 uncond "
                 "checkpoint; null_label: the null-class index of a model trained with label dropout)")

    def __init__(self, scale: float = 1.0, null_label: Optional[int] = None, **kwargs):
        super().__init__(scale=scale, **kwargs)
        self.set_null_label(null_label)

    def unconditional_eps(self, ctx: StepContext, x: Tensor) -> Tensor:
        """eps(x_t, null) from the null label or the unconditional model (``UnconditionalPath``)."""
        return self.unconditional(ctx, x).eps

    def guide_eps(self, ctx: StepContext, eps: Tensor, w: float | Tensor) -> Tensor:
        if not isinstance(w, Tensor) and w == 0.0:
            return eps  # w = 0 is exactly the conditional model: skip the second call
        eps_uncond = self.unconditional_eps(ctx, ctx.x).to(eps.dtype)
        return (1 + w) * eps - w * eps_uncond
