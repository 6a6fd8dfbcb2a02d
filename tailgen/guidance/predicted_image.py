"""The second guidance of the target paper: toward the predicted real image x0_hat (methods.md §4.1 (f)-(i)).

Two classes, because the variants act at different hook points with different costs:

* ``PredictedImagePull`` (f)/(g)/(h): free post-step updates (H5) on x_{t-1} built from x0_hat and eps_hat of
  the step's own network call (``ctx.pred``), with abar_{t-1} = ``process.alphas_cumprod_prev[i]``.
* ``PredictedImageGradient`` (i): a ``GradientGuidance`` whose direction grad_{x_t} J(x0_hat(x_t)) is
  differentiated through the denoiser (one extra network forward + backward per active step), so it gets
  every gradient form (mean / score / pre), ``max_norm`` and composes with the classifier guidances.

Toy calibration (toy-study.md): the plain pulls (f) and (h) lower the noise level below the schedule
(sampling temperature < 1, cf. ADM App. G) and collapse diversity (rare modes vanish at scale = 0.1 per step
with 100 steps, while precision looks *better*); (g) is neutral at best; (i) is untested. All of them are
here so they can be measured side by side.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from tailgen.guidance.base import GradientGuidance, Guidance, StepContext, denoised_gradient
from tailgen.utils import ConfigError

PullVariant = Literal["pull", "snr_pull", "renoise"]
Objective = Literal["classifier_log_prob", "norm"]
PULL_VARIANTS = ("pull", "snr_pull", "renoise")
OBJECTIVES = ("classifier_log_prob", "norm")


class PredictedImagePull(Guidance):
    """Post-step pull of x_{t-1} toward the predicted clean image (H5), with a = sqrt(abar_{t-1}) and
    w = ``scale`` times the schedule weight::

        pull      (f)  x_{t-1} <- x_{t-1} + w (a x0_hat - x_{t-1})
        snr_pull  (g)  x_{t-1} <- (1 - w) x_{t-1} + w (a x0_hat + sqrt(1 - abar_{t-1}) eps_hat)
        renoise   (h)  x_{t-1} <- (1 - w) x_{t-1} + w q_sample(x0_hat, t-1)     (z from ``noise.extra``)

    (f) moves toward a noise-free point (removes part of the noise component: temperature < 1); (g) toward
    the deterministic DDIM point of the same x0_hat, at the right noise level (interpolates DDPM and DDIM); (h) toward
    a fresh re-noising of x0_hat (ILVR-style without a reference). At the last step abar_{t-1} = 1 and all
    three reduce to (1 - w) x_prev + w x0_hat: a no-op when the sampler's last x_prev is x0_hat (DDPM and
    DDIM both end on it, unless a mean-form gradient shifted the last mean).

    Args:
        variant: ``pull`` (f), ``snr_pull`` (g) or ``renoise`` (h).
        scale: per-step pull fraction in [0, 1] (the schedule multiplies it, e.g. ``low_noise`` for a pull
            that decays toward high t). Depends on the step count.
        **kwargs: the window and schedule of ``Guidance`` (t_min, t_max, every, schedule, start, stop).
    """

    def __init__(self, variant: PullVariant = "snr_pull", scale: float = 0.05, **kwargs):
        if variant not in PULL_VARIANTS:
            raise ConfigError(f"PredictedImagePull: unknown variant {variant!r}: use one of {', '.join(PULL_VARIANTS)}")
        if not 0.0 <= scale <= 1.0:
            raise ConfigError(f"PredictedImagePull: scale (the per-step pull fraction) must lie in [0, 1], got {scale}")
        super().__init__(scale=scale, **kwargs)
        self.variant = variant

    def after_step(self, ctx: StepContext, x_prev: Tensor, w: float | Tensor) -> Tensor:
        if ctx.pred is None:
            raise ConfigError("PredictedImagePull: the step has no prediction (ctx.pred); run it through GuidanceStack")
        abar_prev = float(ctx.process.alphas_cumprod_prev[ctx.i])
        a, b = math.sqrt(abar_prev), math.sqrt(1.0 - abar_prev)
        x0 = ctx.pred.x0.to(x_prev.dtype)
        if self.variant == "pull":
            return x_prev + w * (a * x0 - x_prev)
        if self.variant == "snr_pull":
            target = a * x0 + b * ctx.pred.eps.to(x_prev.dtype)
        else:
            if ctx.noise is None:
                raise ConfigError("PredictedImagePull(variant='renoise') needs the sampler's noise source (ctx.noise)")
            target = a * x0 + b * ctx.noise.extra(x_prev).to(x_prev)
        return (1 - w) * x_prev + w * target


class PredictedImageGradient(GradientGuidance):
    """(i) Gradient of a clean-image objective through the denoiser ("forward" universal guidance)::

        d = grad_{x_t} J(x0_hat(x_t)),   x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps_theta(x_t, y)) / sqrt(abar_t)

    x0_hat is not clipped (clipping would zero the gradient outside [-1, 1]). Objectives:

    * ``classifier_log_prob``: J = log p_phi(y | x0_hat) from the noisy classifier at its smallest timestep
      (respaced index 0, original t = 0 for every respacing), i.e. used as a clean classifier.
    * ``norm``: J = -||x0_hat - clamp(x0_hat, -1, 1)||^2, a pull back into the data box that needs no classifier.

    Costs one extra denoiser forward + backward (and one classifier forward + backward) per active step.

    Args:
        objective: ``classifier_log_prob`` or ``norm``.
        **kwargs: scale, form, max_norm (``GradientGuidance``) and the window / schedule (``Guidance``).
    """

    def __init__(self, objective: Objective = "norm", **kwargs):
        if objective not in OBJECTIVES:
            raise ConfigError(
                f"PredictedImageGradient: unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}"
            )
        super().__init__(**kwargs)
        self.objective = objective

    @property
    def uses_classifier(self) -> bool:  # type: ignore[override]
        return self.objective == "classifier_log_prob"

    def classifier_objectives(self) -> frozenset[str]:
        return frozenset()  # its classifier call is on x0_hat, through the denoiser: not the step's ClassifierEval

    def objective_value(self, ctx: StepContext, x0: Tensor) -> Tensor:
        """J(x0) per sample [B] (differentiable)."""
        if self.objective == "norm":
            return -(x0 - x0.clamp(-1, 1)).pow(2).flatten(1).sum(1)
        if ctx.noisy_classifier is None:
            raise ConfigError("PredictedImageGradient(objective='classifier_log_prob') needs a classifier: "
                              "set model.classifier or use objective='norm'")
        if ctx.labels is None:
            raise ConfigError("PredictedImageGradient(objective='classifier_log_prob') needs class labels")
        log_probs = torch.log_softmax(ctx.noisy_classifier(x0, 0).float(), dim=-1)
        return log_probs[torch.arange(len(ctx.labels), device=ctx.labels.device), ctx.labels]

    def direction(self, ctx: StepContext) -> Tensor:
        return denoised_gradient(ctx, lambda x0: self.objective_value(ctx, x0))
