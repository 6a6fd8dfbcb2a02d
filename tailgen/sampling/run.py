"""``SamplingRun``: what a sampler hands on besides its own math, in one object (k-diffusion's ``model`` +
``extra_args`` + ``callback`` + ``disable``), and the per-step plumbing every sampler shares.

It holds the denoiser side of a run: the denoiser and the guided prediction around it (guidance stack, noisy
classifier, unconditional model, extra network inputs, x0 clipping), the noise source, the read-only callback and
the progress bar. A sampler is then only its update rule, a short loop with one comment per stage::

    @torch.no_grad()
    def sample_euler(run: SamplingRun, x, process, labels=None):
        for ctx in run.steps("euler", x, process, labels):    # a StepContext per step, noisiest first
            # Guided prediction: H3, network, H1, clipped x0_hat, score-form gradients, H4
            pred = run.predict(ctx)
            # Euler step of the probability-flow ODE in (x / alpha, sigma / alpha) from pred.x
            ...
            x = run.finish(ctx, x, pred.x0)                   # H5 after_step, non-finite check, callback
        return x

(``tests/test_sampling_api.py`` writes this sampler out in full and checks it against DDIM.) The math of the
guided prediction is ``GuidanceStack.predict``; the math of each update is in its sampler's file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from torch import Tensor
from tqdm.auto import tqdm

from tailgen.diffusion.noise import NoiseSource, TorchNoise
from tailgen.guidance.base import Guidance, GuidedPrediction, StepContext
from tailgen.guidance.stack import GuidanceStack
from tailgen.sampling.sanity import check_finite

Callback = Optional[Callable[[dict], None]]
GuidanceArg = Optional[GuidanceStack | Guidance | Sequence[Guidance]]


def as_stack(guidance: GuidanceArg) -> GuidanceStack:
    """None (unguided), one guidance, a sequence of guidances or a stack -> a ``GuidanceStack``."""
    if guidance is None:
        return GuidanceStack()
    if isinstance(guidance, Guidance):
        return GuidanceStack([guidance])
    return guidance if isinstance(guidance, GuidanceStack) else GuidanceStack(list(guidance))


class BoundDenoiser:
    """A denoiser with extra network inputs bound (``low_res`` for the upsampler); other attributes (e.g.
    ``class_embedding``) are the wrapped denoiser's."""

    def __init__(self, denoiser, **model_kwargs):
        self.denoiser, self.model_kwargs = denoiser, model_kwargs

    def __call__(self, x, i, labels=None, **kwargs):
        return self.denoiser(x, i, labels, **self.model_kwargs, **kwargs)

    def __getattr__(self, name: str):
        if name == "denoiser":  # not set yet (e.g. during copy): no recursion
            raise AttributeError(name)
        return getattr(self.denoiser, name)


@dataclass(eq=False)
class SamplingRun:
    """The denoiser side of one sampling run; every sampler takes it as its first argument.

    Args:
        denoiser: ``(x, i, labels=None, class_emb=None, **model_kwargs) -> Prediction`` over respaced indices i
            (e.g. ``ADMDenoiser``).
        guidance: a ``GuidanceStack``, one guidance, a sequence of them, or None (unguided); stored as a stack.
            The stack is validated against the sampler and the networks at the first ``steps`` (cached by the
            stack: a stack reused across batches is checked once).
        noise: the noise source (``SeededNoise`` for per-sample seeds, ``ReplayNoise`` for recorded noise);
            default ``TorchNoise`` (the global RNG).
        noisy_classifier: ``(x, i) -> logits`` on noisy x_t (``NoisyClassifier``), for classifier-based guidances.
        uncond: ``(x, i) -> Prediction`` of a separate unconditional model (classifier-free guidance).
        model_kwargs: extra network inputs bound into the denoiser (``low_res`` for the upsampler).
        clip_denoised: clamp x0_hat to [-1, 1] at every step (guided-diffusion's default).
        callback: read-only observer called once per step with ``{"x", "x0", "step", "t", "i", "terms",
            "network_term"}`` (x = x_{i-1} after the step).
        progress: a progress bar over the steps.
    """

    denoiser: Callable[..., Any]
    guidance: GuidanceArg = None
    noise: Optional[NoiseSource] = None
    noisy_classifier: Optional[Callable[[Tensor, int], Tensor]] = None
    uncond: Optional[Callable[..., Any]] = None
    model_kwargs: dict = field(default_factory=dict)
    clip_denoised: bool = True
    callback: Callback = None
    progress: bool = False

    def __post_init__(self):
        self.guidance = as_stack(self.guidance)
        if self.noise is None:
            self.noise = TorchNoise()
        self._network = BoundDenoiser(self.denoiser, **self.model_kwargs) if self.model_kwargs else self.denoiser
        self._x: Optional[Tensor] = None

    def steps(self, sampler: str, x: Tensor, process, labels: Optional[Tensor] = None) -> Iterator[StepContext]:
        """Check the guidance for this sampler, then yield the context of respaced indices i = K-1 .. 0 at the
        current x (the one ``finish`` returned), with a progress bar over the steps.

        ``sampler`` is the name guidances see as ``ctx.sampler`` (``"ddpm"`` is the only ancestral one: gradient
        guidances with ``form: auto`` take the mean form there and the score form elsewhere)."""
        self.guidance.validate(sampler=sampler, has_classifier=self.noisy_classifier is not None,
                               has_uncond=self.uncond is not None)
        K = process.num_steps
        self._x = x
        for k in tqdm(range(K), desc=sampler, disable=not self.progress, leave=False):
            yield StepContext(step=k, num_steps=K, i=K - 1 - k, process=process, x=self._x, labels=labels,
                              sampler=sampler, denoiser=self._network, uncond=self.uncond,
                              noisy_classifier=self.noisy_classifier, noise=self.noise)

    def predict(self, ctx: StepContext) -> GuidedPrediction:
        """The guided prediction at ctx.x: H3, network, H1, x0_hat (clipped if asked), score-form gradients, H4."""
        return self.guidance.predict(ctx, self.clip_denoised)

    def mean_gradient(self, ctx: StepContext) -> Optional[Tensor]:
        """Sum of mean-form guidance gradients w g at x_t (None without any); ancestral samplers add Sigma * it."""
        return self.guidance.mean_gradient(ctx)

    def finish(self, ctx: StepContext, x: Tensor, x0: Tensor) -> Tensor:
        """End a step at x = x_{i-1}: H5 ``after_step`` hooks, the non-finite check (naming the guidance whose term
        blew up), then the read-only callback (``terms``: per-guidance term RMS, ``network_term``: the network's
        score). Returns the x the next step starts from."""
        x = self.guidance.after_step(ctx, x)
        check_finite(ctx, x, self.guidance)
        if self.callback is not None:
            self.callback({"x": x, "x0": x0, "step": ctx.step, "t": ctx.t, "i": ctx.i, "terms": ctx.terms,
                           "network_term": ctx.network_term})
        self._x = x
        return x
