"""Low-density (tail) guidance: a density-aware modification of the classifier gradient that steers x_t
toward lower classifier confidence while keeping class y (methods.md §4.1, variants (a)-(e); our proposals
for the target paper, arXiv 2606.13347, whose equations are not public).

Notation: p = p_phi(y | x_t, t) of the noisy classifier, g_y = grad_{x_t} log p. ``scale`` (s) multiplies
the whole direction, so ``lam`` is *relative* to s (absolute lambda = s * lam) and the shape of the field,
e.g. the fixed point of (a), does not move when a sweep changes s.

=============  ========================================================  ==========================================
variant        direction d (the guidance applies s * d)                  notes
=============  ========================================================  ==========================================
``complement`` (a) g_y + lam grad log(1 - p) = (1 - lam p/(1-p)) g_y      fixed point p* = 1/(1 + lam) (attractive
                                                                         below, repulsive above); absolute form
                                                                         s g_y + L grad log(1-p), p* = s/(s + L)
``negative``   (b) -g_y                                                  samples ~ p(x|y) p(y|x)^-s; not density-aware
``entropy``    (c) g_y + lam grad H,  H = -sum_c p_c log p_c              toward class-ambiguous regions
``damped``     (d) sg[(1 - p)^gamma] g_y                                 focal-style; stop-gradient weight
``target``     (e) -grad (p - c*)^2 = -2 (p - c*) p g_y        (prob)   pulls p toward c* = target_confidence
                   -grad (log p - log c*)^2 = -2 log(p/c*) g_y  (log)    from both sides
=============  ========================================================  ==========================================

Toy calibration (toy-study.md, 2-D mixture, DDPM mean-shift form): (e) target c*=0.5, s=2 and (c) entropy
s=1, lam=2 restore the class-ambiguous rare mode that ADM-G erases, at equal fidelity; (a) without a
magnitude cap or time window drags 10-99 % of samples off the manifold (grad log(1-p) does not vanish
where the classifier is confident): use it with ``max_norm`` and/or ``t_min``; (b) destroys class
fidelity at s >= 1; (d) only acts as a weaker ADM-G. Hence the default variant is ``target``.

Where it is applied (``form``): ``auto`` = mean shift mu' = mu + Sigma s d on DDPM (ADM Alg. 1, H2) and the
score form on DDIM; ``pre`` = on the noisy image before the network call, x_t' = x_t + beta_t s d (H3),
the reading of the paper's "guidance at noisy images"; ``mean`` / ``score`` force one. ``max_norm`` caps
the per-sample RMS of s d; ``t_min``/``t_max``, ``every`` and ``schedule`` gate it in time.

Cost: (b), (d), (e) reuse the step's shared g_y (no extra backward); (a) and (c) add one classifier
backward each (cached by name, so shared with any other guidance asking for the same objective). (a) is
computed as g_y + lam * grad log(1-p) with log(1-p) from ``log_one_minus_p_y`` (bounded gradient) rather
than from the ratio p/(1-p) = exp(log p - log(1-p)), which overflows float32 as p -> 1; the two agree
exactly in real arithmetic (tested).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from tailgen.guidance.base import GradientGuidance, StepContext
from tailgen.guidance.classifier import entropy, log_one_minus_p_y
from tailgen.utils import ConfigError

Variant = Literal["complement", "negative", "entropy", "damped", "target"]
TargetSpace = Literal["prob", "log"]
VARIANTS = ("complement", "negative", "entropy", "damped", "target")
TARGET_SPACES = ("prob", "log")


class LowDensityGuidance(GradientGuidance):
    """Tail guidance from the noisy classifier, variants (a)-(e) of methods.md §4.1 (see the module docstring).

    Args:
        variant: ``complement`` (a), ``negative`` (b), ``entropy`` (c), ``damped`` (d) or ``target`` (e).
        lam: weight of the repulsive term relative to ``scale``: grad log(1-p) in (a), grad H in (c).
            (a) has its fixed point at p* = 1 / (1 + lam).
        gamma: exponent of the damping weight (1 - p)^gamma in (d).
        target_confidence: c* in (0, 1) for (e).
        target_space: (e) matches ``prob`` (p - c*)^2 or ``log`` (log p - log c*)^2.
        **kwargs: scale, form, max_norm (``GradientGuidance``) and the window / schedule (``Guidance``).
    """

    uses_classifier = True

    def __init__(self, variant: Variant = "target", lam: float = 1.0, gamma: float = 1.0,
                 target_confidence: float = 0.5, target_space: TargetSpace = "prob", **kwargs):
        super().__init__(**kwargs)
        name = type(self).__name__
        if variant not in VARIANTS:
            raise ConfigError(f"{name}: unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
        if target_space not in TARGET_SPACES:
            raise ConfigError(f"{name}: target_space must be one of {', '.join(TARGET_SPACES)}, got {target_space!r}")
        if not lam >= 0:
            raise ConfigError(f"{name}: lam must be >= 0 (it is relative to scale), got {lam}")
        if not gamma >= 0:
            raise ConfigError(f"{name}: gamma must be >= 0, got {gamma}")
        if not 0.0 < target_confidence < 1.0:
            raise ConfigError(f"{name}: target_confidence must lie in (0, 1), got {target_confidence}")
        self.variant, self.lam, self.gamma = variant, float(lam), float(gamma)
        self.target_confidence, self.target_space = float(target_confidence), target_space

    @property
    def fixed_point(self) -> Optional[float]:
        """Confidence p where the direction vanishes: 1/(1+lam) for (a), c* for (e), else None."""
        if self.variant == "complement":
            return 1.0 / (1.0 + self.lam)
        if self.variant == "target":
            return self.target_confidence
        return None

    def classifier_objectives(self) -> frozenset[str]:
        second = {"complement": {"log_1m_p_y"}, "entropy": {"entropy"}}.get(self.variant, set())
        return frozenset({"log_p_y", *second})

    def direction(self, ctx: StepContext) -> Tensor:
        ev = ctx.classifier_eval()
        g_y = ev.grad_log_p_y
        if self.variant == "negative":
            return -g_y
        if self.variant == "complement":
            return g_y + self.lam * ev.grad("log_1m_p_y", lambda e: log_one_minus_p_y(e.logits, e.labels))
        if self.variant == "entropy":
            return g_y + self.lam * ev.grad("entropy", lambda e: entropy(e.log_probs))
        # (d) and (e) are multiples of g_y: coef(p) * g_y with coef computed without gradient (chain rule)
        with torch.no_grad():
            log_p = ev.log_p_y.detach()
            if self.variant == "damped":
                coef = torch.exp(self.gamma * log_one_minus_p_y(ev.logits.detach(), ev.labels))
            else:
                c = self.target_at(ctx)
                c = c.to(log_p) if isinstance(c, Tensor) else torch.tensor(c, dtype=log_p.dtype, device=log_p.device)
                if self.target_space == "prob":
                    p = log_p.exp()
                    coef = -2.0 * (p - c) * p
                else:
                    coef = -2.0 * (log_p - c.log())
        return coef.reshape(-1, *([1] * (g_y.dim() - 1))).to(g_y) * g_y

    def target_at(self, ctx: StepContext) -> float | Tensor:
        """c* of (e) at this step: a float, or one value per sample [B] (subclasses calibrate it per t)."""
        return self.target_confidence
