"""Sample sanity: non-finite values name only the guidance whose term blew up; saturated / constant batches are
refused naming the dominating guidance and its step; normal-looking batches (Fashion-like black background) pass."""

import math

import pytest
import torch

from tailgen.diffusion import DiffusionProcess, Prediction, SeededNoise
from tailgen.guidance import Guidance, GuidanceStack
from tailgen.guidance.classifier import ClassifierGuidance
from tailgen.sampling import SamplingRun, sample
from tailgen.sampling.sanity import SATURATION_LIMIT, SampleMonitor, saturation_share
from tailgen.utils import ConfigError, SamplingError

SHAPE = (1, 8, 8)


class Push(Guidance):
    """after_step: x <- x + w * (+1 on even pixels, -1 on odd ones); w = inf blows up."""

    def after_step(self, ctx, x_prev, w):
        sign = torch.ones_like(x_prev).flatten(1)
        sign[:, 1::2] = -1
        return x_prev + w * sign.reshape(x_prev.shape)


def shrink(x, i, labels=None):  # a network whose x0_hat is 0.5 x_t-ish: samples stay in range
    return Prediction(eps=0.5 * x)


def run(guidances, monitor=None):
    p = DiffusionProcess.from_flags(timestep_respacing="10")
    stack = GuidanceStack(guidances)
    run = SamplingRun(shrink, guidance=stack, noise=SeededNoise([0, 1, 2, 3]), callback=monitor)
    return sample("ddpm", run, torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0)), p), stack


def test_nan_names_only_the_guidance_that_blew_up():
    with pytest.raises(SamplingError) as info:
        run({"mild": Push(scale=1e-3), "wild": Push(scale=1e300), "late": Push(scale=1e300, t_max=0.5)})
    message = str(info.value)
    assert "'wild'" in message and "'mild'" not in message and "step 0 of 10" in message


def test_saturated_batch_names_the_dominating_guidance_and_step():
    stack = GuidanceStack({"mild": Push(scale=1e-4), "strong": Push(scale=50.0, t_min=0.3, t_max=0.35)})
    monitor = SampleMonitor(stack)
    p = DiffusionProcess.from_flags(timestep_respacing="10")
    x = sample("ddpm", SamplingRun(shrink, guidance=stack, noise=SeededNoise([0, 1, 2, 3]), callback=monitor),
               torch.randn(4, *SHAPE), p)
    with pytest.raises(SamplingError, match=r"saturated.*guidance 'strong' \(Push, scale 50\) dominated.*step 6 of 10"):
        monitor.check(x)


def test_a_guidance_peaking_at_the_first_step_is_told_to_stay_off_it():
    stack = GuidanceStack({"strong": Push(scale=50.0, t_min=0.95)})
    monitor = SampleMonitor(stack)
    p = DiffusionProcess.from_flags(timestep_respacing="10")
    x = sample("ddpm", SamplingRun(shrink, guidance=stack, noise=SeededNoise([0, 1, 2, 3]), callback=monitor),
               torch.randn(4, *SHAPE), p)
    with pytest.raises(SamplingError, match=r"step 0 of 10.*lower that guidance's scale or keep it off the first "
                                            r"step.*t_max: 0\.99"):
        monitor.check(x)


def test_normal_batch_passes_and_toy_points_are_not_judged():
    monitor = SampleMonitor(GuidanceStack({"mild": Push(scale=1e-4)}))
    x, _ = run({"mild": Push(scale=1e-4)}, monitor)
    assert monitor.check(x) is x
    assert monitor.check(torch.full((4, 2), 7.0)) is not None  # 2-D toy samples: no pixel range


@pytest.mark.parametrize("case, trips", [
    ("fashion_like", False),  # half the pixels at the lower bound (black background), the rest inside
    ("both_bounds", True),    # half at -1, half at +1
    ("far_beyond", True),     # one-sided, far past the upper bound
    ("constant", True),       # one image a single grey value
])
def test_saturation_and_constant(case, trips):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 28, 28, generator=g) * 1.6 - 0.8
    if case == "fashion_like":
        x[..., :14] = -1
    elif case == "both_bounds":
        x[..., :14], x[..., 14:] = -1, 1
    elif case == "far_beyond":
        x[..., :10] = 3.0
    elif case == "constant":
        x[3] = 0.25
    monitor = SampleMonitor(GuidanceStack())
    if trips:
        with pytest.raises(SamplingError, match="degenerate samples.*no guidance is active"):
            monitor.check(x)
    else:
        assert float(saturation_share(x)) < SATURATION_LIMIT / 2
        monitor.check(x)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scale_rejected_at_construction(scale):
    with pytest.raises(ConfigError, match="scale must be a finite number"):
        ClassifierGuidance(scale=scale)
    with pytest.raises(ConfigError, match="max_norm"):
        ClassifierGuidance(scale=1.0, max_norm=scale)
