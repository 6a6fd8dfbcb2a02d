"""Plumbing shared by the sampler loops: the guidance stack, the per-step context, the step iterator and the
non-finite check. The math lives in the samplers; the guided prediction routine is ``GuidanceStack.predict``."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from tailgen.diffusion.noise import NoiseSource, TorchNoise
from tailgen.guidance.base import Guidance, StepContext
from tailgen.guidance.stack import GuidanceStack
from tailgen.sampling.sanity import check_finite
from tailgen.utils.errors import ConfigError

Callback = Optional[Callable[[dict], None]]
GuidanceArg = Optional[GuidanceStack | Guidance | Sequence[Guidance]]


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


class Loop:
    """One sampling run: validates the setup, then yields a :class:`StepContext` per step (noisiest first).

    Args:
        sampler: ``"ddpm" | "ddim" | "dpmpp_2m"`` (what guidances see as ``ctx.sampler``).
        denoiser: ``(x, i, labels, **model_kwargs) -> Prediction`` (e.g. ``ADMDenoiser``).
        model_kwargs: extra network inputs bound into the denoiser (``low_res`` for the upsampler).
    """

    def __init__(self, sampler: str, denoiser, process, labels, *, guidance: GuidanceArg = None,
                 noise: NoiseSource | None = None, classifier=None, uncond=None, model_kwargs: dict | None = None,
                 progress: bool = False):
        if guidance is None:
            guidance = GuidanceStack()
        elif isinstance(guidance, Guidance):
            guidance = GuidanceStack([guidance])
        elif not isinstance(guidance, GuidanceStack):
            guidance = GuidanceStack(list(guidance))
        guidance.validate(sampler=sampler, has_classifier=classifier is not None, has_uncond=uncond is not None)
        self.sampler, self.process, self.labels, self.stack = sampler, process, labels, guidance
        self.noise = noise if noise is not None else TorchNoise()
        self.classifier, self.uncond, self.progress = classifier, uncond, progress
        self.denoiser = BoundDenoiser(denoiser, **model_kwargs) if model_kwargs else denoiser

    def steps(self, x: torch.Tensor) -> Iterator[StepContext]:
        """Contexts for respaced indices i = K-1 .. 0 at the current x, with a progress bar over the steps."""
        K = self.process.num_steps
        self.x = x
        for k in tqdm(range(K), desc=self.sampler, disable=not self.progress, leave=False):
            i = K - 1 - k
            yield StepContext(step=k, num_steps=K, i=i, process=self.process, x=self.x, labels=self.labels,
                              sampler=self.sampler, denoiser=self.denoiser, uncond=self.uncond,
                              classifier_net=self.classifier, noise=self.noise)

    def finish_step(self, ctx: StepContext, x: torch.Tensor, x0: torch.Tensor, callback: Callback) -> torch.Tensor:
        """H5 ``after_step`` hooks, the non-finite check (naming the guidance whose term blew up), then the
        read-only callback (``terms``: per-guidance term RMS of the step, ``network_term``: the network's score)."""
        x = self.stack.after_step(ctx, x)
        check_finite(ctx, x, self.stack)
        if callback is not None:
            callback({"x": x, "x0": x0, "step": ctx.step, "t": ctx.t, "i": ctx.i, "terms": ctx.terms,
                      "network_term": ctx.network_term})
        self.x = x
        return x


def check_eta(eta: float) -> float:
    if not 0.0 <= float(eta) <= 1.0:
        raise ConfigError(f"DDIM eta must be in [0, 1] (0 = deterministic, 1 = DDPM-like), got {eta}")
    return float(eta)
