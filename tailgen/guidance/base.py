"""The guidance contract: one step's context, the shared classifier evaluation, the ``Guidance`` base
class (``stack.py`` holds the ``GuidanceStack`` that composes guidances around a sampler step).

Hook points follow methods.md §0:

====  ==============================  ======================================================
H1    eps / score modification        ``guide_eps`` (CFG) and score-form gradients (ADM Alg. 2)
H2    mean shift                      mean-form gradients: mu' = mu + Sigma * g (ADM Alg. 1)
H3    x_t update before the network   ``before_model`` and pre-form gradients: x' = x + beta_i * g
H4    x0_hat modification             ``guide_x0``
H5    post-step update on x_{t-1}     ``after_step``
H6    gating / scheduling             ``t_min``/``t_max``/``every``/``schedule``/``sample_scale``
Hc    the conditioning signal          ``guide_condition`` (CADS): the class embedding the network sees
====  ==============================  ======================================================

A step runs (``GuidanceStack.predict`` then the sampler's own update)::

    x  <- before_model hooks, then pre-form gradients          (in order)
    if a guide_condition hook is active:                        (Hc)
        emb <- denoiser.class_embedding(labels); emb <- guide_condition hooks (in order)
        eps, log_var <- denoiser(x, i, class_emb=emb)           (one network call)
    else:
        eps, log_var <- denoiser(x, i, labels)                  (one network call)
    eps <- guide_eps hooks                                      (in order)
    x0  <- x0_from_eps(x, eps), clipped to [-1, 1] if asked
    g_score = sum of score-form gradients; if any:              (ADM condition_score)
        eps <- eps_from_x0(x, x0) - sqrt(1 - abar_i) g_score ;  x0 <- x0_from_eps(x, eps)  (not re-clipped)
    x0  <- guide_x0 hooks                                       (in order)
    eps <- eps_from_x0(x, x0)
    sampler update, adding Sigma * (sum of mean-form gradients) to the DDPM mean   (ADM condition_mean)
    x_prev <- after_step hooks                                  (in order)

Every gradient guidance evaluated on x_t uses the one ``ClassifierEval`` of the step: one classifier
forward, one backward per distinct objective, shared by all guidances (ADM-G, EDS and the low-density variants
built on grad log p(y) share one); the networks' own call runs without autograd, so no backward sees UNet
activations, and the backward of the step's last declared objective frees the classifier's.

Each step records, per guidance, the RMS per sample of its *term* expressed as a score (units of
grad_x log p(x_t), the quantity gradient guidances add to): ``w g`` for gradient guidances (any form), and for hook
guidances the change they make, converted: d eps / sqrt(1 - abar) (H1), d x0 sqrt(abar) / (1 - abar) (H4),
d x / beta_i (H3, H5). ``ctx.terms[name]`` holds them and ``ctx.network_term`` the network's own score
RMS |eps| / sqrt(1 - abar), so the sanity checks can say which guidance dominated a step (``sampling/sanity.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Optional

import torch
from torch import Tensor

from tailgen.utils import ConfigError

Schedule = Literal["constant", "high_noise", "low_noise", "middle"]
Form = Literal["auto", "mean", "score", "pre"]

ANCESTRAL_SAMPLERS = ("ddpm",)


# ------------------------------------------------------------------------------------------------
# Step context and the shared classifier evaluation


@dataclass
class GuidedPrediction:
    """Result of the guided prediction at one step: the x the network saw, x0_hat, eps and log Sigma."""

    x: Tensor
    x0: Tensor
    eps: Tensor
    log_var: Optional[Tensor]


class ClassifierEval:
    """One forward of the noisy classifier p_phi(y | x_t, t) on x_t, kept differentiable.

    ``grad(name, objective)`` returns d/dx sum_b objective(self)[b] (one backward per distinct
    objective, cached by name). Because samples are independent, each sample's gradient does not
    depend on the batch. ``grad_log_p_y`` is ADM's ``cond_fn`` without the scale.

    ``objectives``: the names of every objective the step will differentiate (what its active guidances declare,
    ``Guidance.classifier_objectives``), or None where one is not declared. The backward of the last declared
    objective frees the classifier's graph (its saved activations) instead of keeping it for another backward,
    so ADM-G's single backward holds no memory past itself; an objective asked for after that re-runs the
    forward on the same x_t (an undeclared objective costs a second forward, never a wrong gradient).
    """

    def __init__(self, classifier: Callable[[Tensor, int], Tensor], x: Tensor, i: int, labels: Tensor,
                 objectives: Optional[frozenset[str]] = None):
        if labels is None:
            raise ConfigError("classifier guidance needs class labels: sample with labels (data.labels)")
        self._classifier, self._i, self.labels, self.objectives = classifier, i, labels, objectives
        self._forward(x)
        self._grads: dict[str, Tensor] = {}

    def _forward(self, x: Tensor) -> None:
        with torch.enable_grad():
            self.x = x.detach().float().requires_grad_(True)
            self.logits = self._classifier(self.x, self._i).float()
            self.log_probs = torch.log_softmax(self.logits, dim=-1)
        self._has_graph = True

    @property
    def log_p_y(self) -> Tensor:
        """log p(y | x_t) per sample (differentiable)."""
        return self.log_probs[torch.arange(len(self.labels), device=self.labels.device), self.labels]

    @property
    def probs(self) -> Tensor:
        return self.log_probs.detach().exp()

    @property
    def p_y(self) -> Tensor:
        return self.log_p_y.detach().exp()

    def grad(self, name: str, objective: Callable[["ClassifierEval"], Tensor]) -> Tensor:
        """Gradient w.r.t. x_t of ``objective(self).sum()``, cached under ``name``; the graph is kept for a later
        backward unless ``name`` is the last of the declared ``objectives``."""
        if name not in self._grads:
            if not self._has_graph:  # freed by the last declared objective: recompute (same x_t, same logits)
                self._forward(self.x)
            keep = self.objectives is None or bool(self.objectives - self._grads.keys() - {name})
            with torch.enable_grad():
                value = objective(self).sum()
                (g,) = torch.autograd.grad(value, self.x, retain_graph=keep)
            self._grads[name], self._has_graph = g, keep
        return self._grads[name]

    @property
    def grad_log_p_y(self) -> Tensor:
        """grad_x log p(y | x_t) (ADM cond_fn with scale 1)."""
        return self.grad("log_p_y", lambda e: e.log_p_y)


@dataclass
class StepContext:
    """Everything a guidance may read at one sampler step. Guidances never mutate it directly."""

    step: int  # 0 = noisiest step
    num_steps: int
    i: int  # respaced index of x_t (num_steps-1 .. 0); x_prev has index i - 1 (-1: clean)
    process: Any  # tailgen.diffusion.DiffusionProcess
    x: Tensor  # x_t (after any before_model update)
    labels: Optional[Tensor]
    sampler: str
    denoiser: Callable[..., Any]  # (x, i, labels) -> diffusion.adapters.Prediction
    uncond: Optional[Callable[..., Any]] = None  # (x, i) -> Prediction of the unconditional model
    noisy_classifier: Optional[Callable[[Tensor, int], Tensor]] = None  # (x, i) -> logits (NoisyClassifier)
    noise: Any = None  # diffusion.noise.NoiseSource
    pred: Optional[GuidedPrediction] = None
    terms: dict = field(default_factory=dict)  # guidance name -> [B] RMS of its term as a score (see module doc)
    network_term: Optional[Tensor] = None  # [B] RMS of the network's own score |eps| / sqrt(1 - abar)
    # names of the ClassifierEval objectives the step's active guidances differentiate (None: not all declared)
    classifier_objectives: Optional[frozenset[str]] = None
    _classifier_eval: Optional[ClassifierEval] = field(default=None, repr=False)

    @property
    def t(self) -> int:
        """Original timestep index of x_t (what the networks see)."""
        return int(self.process.timestep_map[self.i])

    @property
    def tau(self) -> float:
        """Diffusion time t / T in [0, 1)."""
        return self.t / self.process.num_timesteps

    def set_x(self, x: Tensor) -> None:
        """Replace x_t (H3); the classifier evaluation is recomputed at the new point when asked."""
        self.x = x
        self._classifier_eval = None

    def classifier_eval(self) -> ClassifierEval:
        """The step's shared evaluation of the noisy classifier at x_t (computed once, on first use)."""
        if self.noisy_classifier is None:
            raise ConfigError(
                "a classifier-based guidance is configured but no classifier is loaded: "
                "set model.classifier (a preset and checkpoint) or remove that guidance"
            )
        if self._classifier_eval is None:
            self._classifier_eval = ClassifierEval(self.noisy_classifier, self.x, self.i, self.labels,
                                                   self.classifier_objectives)
        return self._classifier_eval


# ------------------------------------------------------------------------------------------------
# Guidance base classes


def schedule_weight(schedule: str, tau: float) -> float:
    """Weight of a guidance as a function of diffusion time tau = t/T (1 = pure noise)."""
    if schedule == "constant":
        return 1.0
    if schedule == "high_noise":
        return tau
    if schedule == "low_noise":
        return 1.0 - tau
    if schedule == "middle":
        return math.sin(math.pi * tau)
    raise ConfigError(f"unknown guidance schedule {schedule!r}: use constant, high_noise, low_noise or middle")


class Guidance:
    """Base of every guidance: a scale, an active window and a scale schedule (hook H6).

    Args:
        scale: overall strength w (0 turns the guidance off). Every guidance calls its strength ``scale``.
        t_min, t_max: active while t_min <= t/T <= t_max (t the original timestep, T the process length;
            t/T = 1 is pure noise).
        every: active on every k-th sampler step only (step 0, k, 2k, ...).
        schedule: weight as a function of tau = t/T: constant, high_noise (tau), low_noise (1 - tau),
            middle (sin(pi tau)).
        start, stop: the same window in diffusers' vocabulary (``BaseGuidance``): fractions of the sampling
            run, active on steps k with int(start K) <= k < int(stop K) of K steps (k = 0 is the noisiest).
            For a uniformly respaced run this is t_max ~ 1 - start, t_min ~ 1 - stop. Both windows gate
            (a step must lie in both); leave one of them at its default.

    Subclasses override any of the hooks; each hook receives the weight ``w`` (a float, or a
    [B, 1, ..., 1] tensor when ``sample_scale`` gives per-sample weights) and must return its input
    unchanged when it has nothing to do. A subclass that forwards ``**kwargs`` to ``super().__init__``
    keeps every knob above on YAML and the command line (jsonargparse follows the call)::

        class Sharpen(Guidance):
            def __init__(self, kernel: int = 3, **kwargs):   # scale, t_min, t_max, every, schedule, start, stop
                super().__init__(**kwargs)
    """

    uses_classifier: ClassVar[bool] = False
    uses_uncond: ClassVar[bool] = False

    def __init__(self, scale: float = 1.0, t_min: float = 0.0, t_max: float = 1.0, every: int = 1,
                 schedule: Schedule = "constant", start: float = 0.0, stop: float = 1.0):
        name = type(self).__name__
        if not math.isfinite(float(scale)):
            raise ConfigError(f"{name}: scale must be a finite number, got {scale} (0 turns the guidance off)")
        if not 0.0 <= t_min <= t_max <= 1.0:
            raise ConfigError(f"{name}: need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if not 0.0 <= start < stop <= 1.0:
            raise ConfigError(f"{name}: need 0 <= start < stop <= 1 (fractions of the sampling run), "
                              f"got start={start}, stop={stop}")
        if every < 1:
            raise ConfigError(f"{name}: every must be >= 1, got {every}")
        schedule_weight(schedule, 0.5)  # validates the name
        self.scale, self.t_min, self.t_max, self.every, self.schedule = float(scale), t_min, t_max, every, schedule
        self.start, self.stop = start, stop

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    # -- gating and weights (H6)
    def active(self, ctx: StepContext) -> bool:
        in_run = int(self.start * ctx.num_steps) <= ctx.step < int(self.stop * ctx.num_steps)
        return (self.scale != 0.0 and self.t_min <= ctx.tau <= self.t_max and in_run
                and ctx.step % self.every == 0)

    def sample_scale(self, ctx: StepContext) -> Optional[Tensor]:
        """Optional per-sample multiplier [B] (e.g. from classifier entropy); None = 1."""
        return None

    def weight(self, ctx: StepContext) -> float | Tensor:
        w = self.scale * schedule_weight(self.schedule, ctx.tau)
        per_sample = self.sample_scale(ctx)
        if per_sample is None:
            return w
        return w * per_sample.reshape(-1, *([1] * (ctx.x.dim() - 1))).to(ctx.x)

    def classifier_objectives(self) -> Optional[frozenset[str]]:
        """The names of the ``ClassifierEval.grad`` objectives this guidance differentiates when active (e.g.
        ``{"log_p_y"}``); None: not declared, so the step keeps the classifier graph for any later backward.
        Default: none for a guidance without ``uses_classifier``, not declared for one with it."""
        return None if self.uses_classifier else frozenset()

    def validate(self, *, sampler: str, has_classifier: bool, has_uncond: bool) -> None:
        """Raise ConfigError if this guidance cannot run with the given sampler / networks."""
        name = type(self).__name__
        if self.uses_classifier and not has_classifier:
            raise ConfigError(f"{name} needs a noisy classifier: set model.classifier (preset + checkpoint)")

    # -- hooks (identity by default)
    def before_model(self, ctx: StepContext, x: Tensor, w: float | Tensor) -> Tensor:  # H3
        return x

    def guide_condition(self, ctx: StepContext, emb: Tensor, w: float | Tensor) -> Tensor:  # Hc
        """Change the class embedding (B, D) the step's network call sees (labels -> ``class_embedding``)."""
        return emb

    def guide_eps(self, ctx: StepContext, eps: Tensor, w: float | Tensor) -> Tensor:  # H1
        return eps

    def guide_x0(self, ctx: StepContext, x0: Tensor, w: float | Tensor) -> Tensor:  # H4
        return x0

    def after_step(self, ctx: StepContext, x_prev: Tensor, w: float | Tensor) -> Tensor:  # H5
        return x_prev


class UnconditionalPath:
    """Mixin (listed before ``Guidance``) of the guidances that need the unconditional prediction eps(x_t, no class).

    It comes from the conditional network called with every label replaced by ``null_label`` (the "no class"
    token of a model trained with label dropout), else from a separate unconditional model (``ctx.uncond``, config
    key ``model.unconditional``); ``null_label`` wins when both exist. A subclass calls ``set_null_label`` in its
    ``__init__`` and states the fix for a missing path in ``no_uncond``, raised by ``validate`` (up front) and by
    ``unconditional`` (at run time, for a stack that was never validated).
    """

    no_uncond: ClassVar[str] = "this guidance needs an unconditional model or a null_label"
    null_label: Optional[int] = None

    def set_null_label(self, null_label: Optional[int]) -> None:
        if null_label is not None and (isinstance(null_label, bool) or int(null_label) != null_label or null_label < 0):
            raise ConfigError(f"{type(self).__name__}: null_label must be a non-negative integer or null, "
                              f"got {null_label!r}")
        self.null_label = None if null_label is None else int(null_label)

    @property
    def uses_uncond(self) -> bool:
        """True when the separate unconditional model is used (no ``null_label``)."""
        return self.null_label is None

    def validate(self, *, sampler: str, has_classifier: bool, has_uncond: bool) -> None:
        super().validate(sampler=sampler, has_classifier=has_classifier, has_uncond=has_uncond)  # type: ignore[misc]
        if self.uses_uncond and not has_uncond:
            raise ConfigError(self.no_uncond)

    def unconditional(self, ctx: StepContext, x: Tensor) -> Any:
        """The unconditional ``Prediction`` (eps, log_var) at (x, ctx.i): the null label's, else ``ctx.uncond``'s."""
        if self.null_label is not None:
            labels = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            return ctx.denoiser(x, ctx.i, labels)
        if ctx.uncond is None:
            raise ConfigError(self.no_uncond)
        return ctx.uncond(x, ctx.i)


class GradientGuidance(Guidance):
    """A guidance given by a direction g(x_t) (usually a classifier gradient), applied as

    * ``mean``:  mu' = mu + Sigma * w g           (ADM Alg. 1, DDPM only)
    * ``score``: eps' = eps - sqrt(1 - abar) w g   (ADM Alg. 2; x0 moves by (1-abar)/sqrt(abar) w g)
    * ``pre``:   x_t' = x_t + beta_i * w g before the network call (methods.md §4.1, H3)
    * ``auto``:  mean on ancestral samplers, score otherwise.

    ``max_norm`` caps the per-sample RMS of w g (L2 norm / sqrt(dim)), which keeps repulsive terms
    from exploding where they do not vanish (toy-study.md §4). ``**kwargs``: the window and schedule of
    ``Guidance`` (t_min, t_max, every, schedule, start, stop).
    """

    def __init__(self, scale: float = 1.0, form: Form = "auto", max_norm: Optional[float] = None, **kwargs):
        super().__init__(scale=scale, **kwargs)
        if form not in ("auto", "mean", "score", "pre"):
            raise ConfigError(f"{type(self).__name__}: form must be auto, mean, score or pre, got {form!r}")
        if max_norm is not None and not 0 < max_norm < math.inf:
            raise ConfigError(f"{type(self).__name__}: max_norm must be positive or null, got {max_norm}")
        self.form, self.max_norm = form, max_norm

    def direction(self, ctx: StepContext) -> Tensor:
        """The unweighted direction g at ctx.x (same shape as x)."""
        raise NotImplementedError

    def resolved_form(self, sampler: str) -> str:
        if self.form == "auto":
            return "mean" if sampler in ANCESTRAL_SAMPLERS else "score"
        return self.form

    def validate(self, *, sampler: str, has_classifier: bool, has_uncond: bool) -> None:
        super().validate(sampler=sampler, has_classifier=has_classifier, has_uncond=has_uncond)
        if self.resolved_form(sampler) == "mean" and sampler not in ANCESTRAL_SAMPLERS:
            raise ConfigError(
                f"{type(self).__name__}: form='mean' needs an ancestral sampler ({', '.join(ANCESTRAL_SAMPLERS)}); "
                f"the {sampler!r} sampler has no Sigma: use form='score' or 'auto'"
            )

    def guided_gradient(self, ctx: StepContext) -> Tensor:
        """w * g, capped per sample at ``max_norm`` (RMS)."""
        g = self.weight(ctx) * self.direction(ctx)
        if self.max_norm is not None:
            rms = g.flatten(1).norm(dim=1) / math.sqrt(g[0].numel())
            factor = (self.max_norm / rms.clamp_min(1e-12)).clamp(max=1.0)
            g = g * factor.reshape(-1, *([1] * (g.dim() - 1)))
        return g


def denoised_gradient(ctx: StepContext, objective: Callable[[Tensor], Tensor]) -> Tensor:
    """grad_{x_t} sum_b J(x0_hat(x_t))_b through the denoiser, with J = ``objective`` ([B, ...] -> [B])::

        x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t, y)) / sqrt(abar_t)       (methods.md §0)

    x0_hat is not clipped (clipping would zero the gradient outside [-1, 1]). Costs one denoiser forward with
    its graph and one backward per call (besides the step's own network call). Samples are independent, so
    each sample's gradient is that of its own J_b.
    """
    with torch.enable_grad():
        x_in = ctx.x.detach().float().requires_grad_(True)
        eps = ctx.denoiser(x_in, ctx.i, ctx.labels).eps.float()
        x0 = ctx.process.x0_from_eps(x_in, ctx.i, eps)
        (g,) = torch.autograd.grad(objective(x0).sum(), x_in)
    return g


def max_normalized(g: Tensor, eps: float = 1e-12) -> Tensor:
    """g / max_j |g_j| per sample (the largest entry of each sample becomes +-1; a zero gradient stays 0)."""
    peak = g.flatten(1).abs().amax(dim=1).clamp_min(eps)
    return g / peak.reshape(-1, *([1] * (g.dim() - 1)))


# ------------------------------------------------------------------------------------------------
# Composition
