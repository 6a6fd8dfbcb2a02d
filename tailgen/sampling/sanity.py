"""Sample sanity, checked cheaply during sampling (no second pass): non-finite values stop the run at the step
they appear; a batch whose final samples are saturated or constant is refused. Both name the guidance whose
term dominated and the step (the per-guidance terms each step records, ``guidance/base.py``).

Saturation statistic (``saturation_share``, per batch, on the final float samples x in [-1, 1]):

    max( min(share at the lower bound, share at the upper bound),  share beyond the bounds by > 0.1 )

"at a bound" = the uint8 value 0 or 255 after guided-diffusion's conversion. The ``min`` ignores one-sided
mass at a bound (Fashion-MNIST's black background is ~50 % of pixels at 0 in the data itself); exploding guidance
pushes pixels to *both* bounds, and without clipping far beyond them. The threshold ``SATURATION_LIMIT`` and the
measurements behind it are in docs/architecture.md (Errors) and ``tools/measure_saturation.py``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from tailgen.utils.errors import SamplingError

SATURATION_LIMIT = 0.10  # see the module docstring and docs/architecture.md for the measured margin
BEYOND = 0.1  # "far beyond the bounds": |x| > 1 + BEYOND (13 grey levels past 0 / 255)


def saturation_share(x: Tensor) -> Tensor:
    """The saturation statistic of a batch of images x (float, nominally [-1, 1]); 0-dim tensor in [0, 1]."""
    x = x.detach().float()
    low = (x < -1 + 1 / 127.5).float().mean()  # uint8 0 (guided-diffusion truncates (x + 1) * 127.5)
    high = (x >= 1).float().mean()  # uint8 255
    beyond = (x.abs() > 1 + BEYOND).float().mean()
    return torch.maximum(torch.minimum(low, high), beyond)


def _describe(name: str, guidance) -> str:
    scale = getattr(guidance, "scale", None)
    detail = f"{type(guidance).__name__}, scale {scale:g}" if isinstance(scale, float) else type(guidance).__name__
    return f"guidance {name!r} ({detail})"


def check_finite(ctx, x: Tensor, stack) -> None:
    """SamplingError if x has NaN / inf, naming the guidance whose term at this step blew up (non-finite, else
    the largest relative to the network's score), or the network when no guidance term stands out."""
    if torch.isfinite(x).all():
        return
    where = f"step {ctx.step} of {ctx.num_steps} (t={ctx.t})"
    culprit = None
    bad = [name for name, term in ctx.terms.items() if not torch.isfinite(term).all()]
    if bad:
        culprit = bad[0]
    elif ctx.terms:
        ratios = {name: float(_ratio(term, ctx.network_term)) for name, term in ctx.terms.items()}
        name = max(ratios, key=ratios.get)
        culprit = name if ratios[name] > 1 else None
    if culprit is None:
        raise SamplingError(
            f"non-finite values (NaN / inf) at {where}, and no guidance term stood out: the network's output is "
            "not finite; check the weights (checkpoint), trainer.precision and clip_denoised"
        )
    guidance = dict(zip(stack.names, stack.guidances)).get(culprit)
    raise SamplingError(
        f"non-finite values (NaN / inf) at {where}: the term of {_describe(culprit, guidance)} blew up; "
        f"lower that guidance's scale (or set its max_norm)"
    )


def _ratio(term: Tensor, network_term: Optional[Tensor]) -> Tensor:
    """Largest per-sample ratio guidance term / network score (the score floored at 1; NaN counts as inf)."""
    term = torch.nan_to_num(term.float(), nan=float("inf"))
    return (term if network_term is None else term / network_term.float().clamp_min(1.0)).max()


class SampleMonitor:
    """Callback that follows one sampling run (``info["terms"]``, ``info["network_term"]`` of each step) and
    then judges its final samples: ``monitor.check(x)`` raises SamplingError for saturated or constant images.

    Keeps, per guidance, the step where its term was largest relative to the network's score (tensors, no
    device sync during the run)."""

    def __init__(self, stack, callback: Optional[Callable[[dict], None]] = None):
        self.stack, self.callback = stack, callback
        self.peak: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (peak ratio, [step, t] of the peak)
        self.num_steps = 0

    def __call__(self, info: dict) -> None:
        network = info.get("network_term")
        for name, term in info.get("terms", {}).items():
            ratio = _ratio(term, network)
            at = torch.tensor([info["step"], info["t"]], device=ratio.device)
            best = self.peak.get(name)
            if best is None:
                self.peak[name] = (ratio, at)
            else:  # torch.where keeps it on the device: no sync per step
                better = ratio > best[0]
                self.peak[name] = (torch.where(better, ratio, best[0]), torch.where(better, at, best[1]))
        self.num_steps = info["step"] + 1
        if self.callback is not None:
            self.callback(info)

    def culprit(self) -> str:
        """'guidance NAME (...) dominated: its term peaked at step k (t=...) at R x the network's score'."""
        if not self.peak:
            return "no guidance is active: the network or clip_denoised=false is the cause; check the weights"
        name, (ratio, at) = max(self.peak.items(), key=lambda item: float(item[1][0]))
        step, t = (int(v) for v in at.tolist())
        if float(ratio) <= 1:
            return (f"no guidance term exceeded the network's own score (largest: {name!r}, {float(ratio):.2g} x): "
                    "the network or clip_denoised=false is the cause; check the weights")
        guidance = dict(zip(self.stack.names, self.stack.guidances)).get(name)
        fix = "lower that guidance's scale"
        if step == 0:  # t ~ T: a score-form term (ddim, dpmpp_2m) moves x0_hat by (1 - abar) / sqrt(abar) x itself
            fix += (" or keep it off the first step, where alpha_bar ~ 0 magnifies it (e.g. t_max: 0.99; ADM-G with "
                    "ddim / dpmpp_2m on a cosine schedule needs this)")
        return (f"{_describe(name, guidance)} dominated: its term peaked at step {step} of {self.num_steps} (t={t}) "
                f"at {float(ratio):.3g} x the network's own score; {fix}")

    def check(self, x: Tensor) -> Tensor:
        """x unchanged, or SamplingError if the batch is degenerate (saturated or constant images)."""
        if x.dim() != 4:  # images only (the 2-D toy has no pixel range)
            return x
        share = float(saturation_share(x))
        if share > SATURATION_LIMIT:
            raise SamplingError(
                f"degenerate samples: {share:.0%} of pixels saturated (limit {SATURATION_LIMIT:.0%}: pixels at both "
                f"clip bounds or beyond them); {self.culprit()}"
            )
        u8 = ((x.detach().float() + 1) * 127.5).clamp(0, 255).floor().flatten(1)
        constant = (u8.amax(1) == u8.amin(1)).nonzero().flatten()
        if len(constant):
            raise SamplingError(
                f"degenerate samples: {len(constant)} of {len(x)} images are a single constant value "
                f"(first: batch item {int(constant[0])}); {self.culprit()}"
            )
        return x
