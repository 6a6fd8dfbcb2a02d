"""``GuidanceStack``: composes guidances, in order, around one sampler step (the one guided prediction routine).

Order (docs/architecture.md): ``before_model`` -> pre-form gradients -> ``guide_condition`` -> network ->
``guide_eps`` -> x0 (clipped) -> score-form gradients -> ``guide_x0``; mean-form gradients and ``after_step`` are
applied by the sampler update. Every hook is gated by its guidance's window, and every term is recorded (in score
units) for the sample sanity check.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from tailgen.guidance.base import GradientGuidance, GuidedPrediction, Guidance, StepContext
from tailgen.utils import ConfigError


def _overrides(guidance: Guidance, hook: str) -> bool:
    return getattr(type(guidance), hook) is not getattr(Guidance, hook)


def rms(x: Tensor) -> Tensor:
    """Root mean square per sample: [B, ...] -> [B] (float32)."""
    return x.detach().flatten(1).float().pow(2).mean(1).sqrt()


class GuidanceStack:
    """Composes guidances in the given order around one sampler step (see the module docstring).

    ``guidances``: a sequence, or a mapping name -> guidance (the names appear in ``ctx.terms`` and in error
    messages; a sequence is named by class, numbered when a class repeats)."""

    def __init__(self, guidances: Sequence[Guidance] | Mapping[str, Guidance] = ()):
        if isinstance(guidances, Mapping):
            self.names, self.guidances = list(guidances), list(guidances.values())
        else:
            self.guidances = list(guidances)
            classes = [type(g).__name__ for g in self.guidances]
            self.names = [c if classes.count(c) == 1 else f"{c}[{k}]" for k, c in enumerate(classes)]
        self._name_of = {id(g): name for name, g in zip(self.names, self.guidances)}
        self._validated: set[tuple[str, bool, bool]] = set()  # setups (sampler, classifier?, uncond?) checked

    def name_of(self, guidance: Guidance) -> str:
        return self._name_of.get(id(guidance), type(guidance).__name__)

    def _record(self, ctx: StepContext, guidance: Guidance, score: Tensor) -> None:
        """Add a guidance's term (as a score, [B, ...]) to ``ctx.terms``."""
        name = self.name_of(guidance)
        term = rms(score)
        ctx.terms[name] = term if name not in ctx.terms else ctx.terms[name] + term

    def __len__(self) -> int:
        return len(self.guidances)

    def __iter__(self):
        return iter(self.guidances)

    @property
    def uses_classifier(self) -> bool:
        return any(g.uses_classifier for g in self.guidances)

    def validate(self, *, sampler: str, has_classifier: bool, has_uncond: bool) -> None:
        """ConfigError if a guidance cannot run with this sampler and these networks (noisy classifier,
        unconditional model). Checked once per setup: ``GuidedDiffusion`` validates at construction and every
        sampling run asks again, which is free for a setup already checked, so a stack that was never validated
        (a direct sampler user's) still fails before the first step."""
        setup = (sampler, bool(has_classifier), bool(has_uncond))
        if setup in self._validated:
            return
        for g in self.guidances:
            g.validate(sampler=sampler, has_classifier=has_classifier, has_uncond=has_uncond)
        self._validated.add(setup)

    def _active(self, ctx: StepContext, hook: str):
        for g in self.guidances:
            if _overrides(g, hook) and g.active(ctx):
                yield g, g.weight(ctx)

    def _gradients(self, ctx: StepContext, form: str) -> Optional[Tensor]:
        total = None
        for g in self.guidances:
            if isinstance(g, GradientGuidance) and g.resolved_form(ctx.sampler) == form and g.active(ctx):
                grad = g.guided_gradient(ctx)
                self._record(ctx, g, grad)
                total = grad if total is None else total + grad
        return total

    def classifier_objectives(self, ctx: StepContext) -> Optional[frozenset[str]]:
        """The ``ClassifierEval`` objectives the guidances active at this step differentiate (None: one of them does
        not declare its own), so the step's last classifier backward can free the graph."""
        names: set[str] = set()
        for g in self.guidances:
            if g.active(ctx):
                declared = g.classifier_objectives()
                if declared is None:
                    return None
                names |= declared
        return frozenset(names)

    def predict(self, ctx: StepContext, clip_denoised: bool = True) -> GuidedPrediction:
        """The one guided prediction routine shared by every sampler (H3, network, H1, clip, H4)."""
        process, i = ctx.process, ctx.i
        ctx.classifier_objectives = self.classifier_objectives(ctx)
        beta, abar = float(process.betas[i]), float(process.alphas_cumprod[i])
        # H3: move x_t before the network call
        for g, w in self._active(ctx, "before_model"):
            x = g.before_model(ctx, ctx.x, w)
            self._record(ctx, g, (x - ctx.x) / beta)
            ctx.set_x(x)
        g_pre = self._gradients(ctx, "pre")
        if g_pre is not None:
            ctx.set_x(ctx.x + float(process.betas[i]) * g_pre)
        # Hc: the conditioning signal, then one network call
        cond_hooks = list(self._active(ctx, "guide_condition"))
        if cond_hooks:
            emb = self._class_embedding(ctx)
            for g, w in cond_hooks:
                emb = g.guide_condition(ctx, emb, w)
            out = ctx.denoiser(ctx.x, i, class_emb=emb)
        else:
            out = ctx.denoiser(ctx.x, i, ctx.labels)
        eps = out.eps
        ctx.network_term = rms(eps) / math.sqrt(1 - abar)
        # H1: model-level eps guidance (e.g. classifier-free)
        for g, w in self._active(ctx, "guide_eps"):
            guided = g.guide_eps(ctx, eps, w)
            self._record(ctx, g, (guided - eps) / math.sqrt(1 - abar))
            eps = guided
        x0 = process.x0_from_eps(ctx.x, i, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        # H1: score-form gradients, eps re-derived from the clipped x0 (ADM condition_score)
        g_score = self._gradients(ctx, "score")
        if g_score is not None:
            abar_t = torch.tensor(abar, dtype=torch.float32, device=x0.device)
            eps = process.eps_from_x0(ctx.x, i, x0) - (1 - abar_t).sqrt() * g_score.to(x0.dtype)
            x0 = process.x0_from_eps(ctx.x, i, eps)
        # H4: x0_hat guidance
        for g, w in self._active(ctx, "guide_x0"):
            guided = g.guide_x0(ctx, x0, w)
            self._record(ctx, g, (guided - x0) * (math.sqrt(abar) / (1 - abar)))
            x0 = guided
        ctx.pred = GuidedPrediction(x=ctx.x, x0=x0, eps=process.eps_from_x0(ctx.x, i, x0), log_var=out.log_var)
        return ctx.pred

    @staticmethod
    def _class_embedding(ctx: StepContext) -> Tensor:
        if ctx.labels is None:
            raise ConfigError("a conditioning guidance (e.g. CADS) needs class labels and a class-conditional network")
        embed = getattr(ctx.denoiser, "class_embedding", None)
        if embed is None:
            raise ConfigError(f"a conditioning guidance (e.g. CADS) needs a denoiser with class_embedding(labels) "
                              f"(ADMDenoiser), got {type(ctx.denoiser).__name__}")
        return embed(ctx.labels)

    def mean_gradient(self, ctx: StepContext) -> Optional[Tensor]:
        """Sum of mean-form gradients w g at x_t; the DDPM sampler adds Sigma * this to its mean (H2)."""
        return self._gradients(ctx, "mean")

    def after_step(self, ctx: StepContext, x_prev: Tensor) -> Tensor:
        """H5: post-step updates on x_{t-1}, in order."""
        beta = float(ctx.process.betas[ctx.i])
        for g, w in self._active(ctx, "after_step"):
            guided = g.after_step(ctx, x_prev, w)
            self._record(ctx, g, (guided - x_prev) / beta)
            x_prev = guided
        return x_prev


def guidance_configs(guidances: dict[str, Guidance]) -> dict[str, dict]:
    """``{name: {class_path, init_args}}`` of guidance objects (their public attributes; JSON-able values, others
    as repr): what the CLI's config holds, for hparams.yaml / W&B when the module is built in Python."""
    def plain(value):
        return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)

    return {name: {"class_path": f"{type(g).__module__}.{type(g).__qualname__}",
                   "init_args": {k: plain(v) for k, v in vars(g).items() if not k.startswith("_")}}
            for name, g in guidances.items()}
