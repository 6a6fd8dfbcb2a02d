"""Predicted-image guidance (methods.md §4.1 (f)-(i)): the three post-step pulls incl. the last step, and the
gradient through the denoiser against closed forms for a linear denoiser."""

import math

import pytest
import torch

from guidance_stubs import LinearClassifier, LinearDenoiser, batch, make_ctx
from tailgen.diffusion import ReplayNoise
from tailgen.guidance import GuidanceStack, PredictedImageGradient, PredictedImagePull
from tailgen.utils import ConfigError

LABELS = torch.tensor([0, 1, 2, 3])


def predicted(i, sampler="ddpm", noise=None, guidances=()):
    """Run the stack's prediction at step i; returns (ctx, pred, x_prev) with an arbitrary x_prev."""
    ctx = make_ctx(batch(), i=i, labels=LABELS, denoiser=LinearDenoiser(), noise=noise, sampler=sampler)
    pred = GuidanceStack(list(guidances)).predict(ctx, clip_denoised=True)
    return ctx, pred, batch(seed=9)


@pytest.mark.parametrize("i", [7, 3, 1])
def test_pull_formulas(i):
    z = batch(seed=11)
    ctx, pred, x_prev = predicted(i, noise=ReplayNoise(batch(), [], extras=[z]))
    abar = float(ctx.process.alphas_cumprod_prev[i])
    assert abar == pytest.approx(float(ctx.process.alphas_cumprod[i - 1]))
    w = 0.1
    f = PredictedImagePull("pull", scale=w).after_step(ctx, x_prev, w)
    torch.testing.assert_close(f, x_prev + w * (math.sqrt(abar) * pred.x0 - x_prev))
    g = PredictedImagePull("snr_pull", scale=w).after_step(ctx, x_prev, w)
    ddim_point = math.sqrt(abar) * pred.x0 + math.sqrt(1 - abar) * pred.eps
    torch.testing.assert_close(g, (1 - w) * x_prev + w * ddim_point)
    h = PredictedImagePull("renoise", scale=w).after_step(ctx, x_prev, w)
    torch.testing.assert_close(h, (1 - w) * x_prev + w * ctx.process.q_sample(pred.x0, i - 1, z))
    assert ctx.noise.used_extras == 1


def test_last_step_is_a_no_op():
    ctx, pred, x_prev = predicted(0, noise=ReplayNoise(batch(), [], extras=[batch(seed=3)] * 2))
    assert ctx.process.alphas_cumprod_prev[0] == 1.0
    for variant in ("pull", "snr_pull", "renoise"):
        g = PredictedImagePull(variant, scale=0.3)
        torch.testing.assert_close(g.after_step(ctx, x_prev, 0.3), 0.7 * x_prev + 0.3 * pred.x0)
        torch.testing.assert_close(g.after_step(ctx, pred.x0, 0.3), pred.x0)  # the sampler's last x_prev is x0_hat


def test_stack_runs_the_pull_after_the_step_with_its_schedule_weight():
    g = PredictedImagePull("snr_pull", scale=0.2, schedule="low_noise")
    ctx, pred, x_prev = predicted(6, sampler="ddim")
    w = 0.2 * (1 - ctx.tau)
    abar = float(ctx.process.alphas_cumprod_prev[6])
    want = (1 - w) * x_prev + w * (math.sqrt(abar) * pred.x0 + math.sqrt(1 - abar) * pred.eps)
    torch.testing.assert_close(GuidanceStack([g]).after_step(ctx, x_prev), want)


def test_the_strength_is_called_scale():
    g = PredictedImagePull("pull", scale=0.05)
    assert g.scale == 0.05 and "scale=0.05" in repr(g) and "eta" not in repr(g)
    assert not hasattr(g, "eta")
    with pytest.raises(TypeError, match="eta"):
        PredictedImagePull("pull", eta=0.05)
    ctx, _, x_prev = predicted(4)
    assert not PredictedImagePull("pull", scale=0.0).active(ctx)
    assert GuidanceStack([PredictedImagePull("pull", scale=0.0)]).after_step(ctx, x_prev) is x_prev


def linear_x0_coef(process, i, a):
    """x0_hat = c x - d shift for eps = a x + shift."""
    abar = float(process.alphas_cumprod[i])
    return (1 - math.sqrt(1 - abar) * a) / math.sqrt(abar), math.sqrt(1 - abar) / math.sqrt(abar)


def test_gradient_norm_objective_closed_form():
    den, x = LinearDenoiser(a=0.3), batch(scale=3.0)
    ctx = make_ctx(x, i=2, labels=LABELS, denoiser=den)
    c, dd = linear_x0_coef(ctx.process, 2, 0.3)
    x0 = c * x.double() - dd * den.shift[LABELS].double()
    assert (x0.abs() > 1).any()
    want = -2 * (x0 - x0.clamp(-1, 1)) * c
    got = PredictedImageGradient(objective="norm").direction(ctx)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert den.calls[-1][0] == 2 and torch.equal(den.calls[-1][1], LABELS)


def test_gradient_classifier_objective_uses_the_smallest_timestep():
    den, clf, x = LinearDenoiser(a=0.3), LinearClassifier(num_classes=5), batch(scale=0.5)
    ctx = make_ctx(x, i=6, labels=LABELS, denoiser=den, noisy_classifier=clf)
    c, dd = linear_x0_coef(ctx.process, 6, 0.3)
    x0 = c * x.double() - dd * den.shift[LABELS].double()
    want = c * clf.grad_log_p(x0, LABELS)
    g = PredictedImageGradient(objective="classifier_log_prob", scale=2.0)
    torch.testing.assert_close(g.direction(ctx).double(), want, rtol=1e-4, atol=1e-6)
    assert clf.calls == [0] and ctx.process.timestep_map[0] == 0
    torch.testing.assert_close(GuidanceStack([g]).mean_gradient(ctx).double(), 2.0 * want, rtol=1e-4, atol=1e-6)


def test_gradient_needs_a_classifier_only_for_the_classifier_objective():
    with pytest.raises(ConfigError, match="needs a noisy classifier"):
        GuidanceStack([PredictedImageGradient(objective="classifier_log_prob")]).validate(
            sampler="ddim", has_classifier=False, has_uncond=False)
    GuidanceStack([PredictedImageGradient(objective="norm")]).validate(sampler="ddim", has_classifier=False,
                                                                       has_uncond=False)


@pytest.mark.parametrize("make,word", [
    (lambda: PredictedImagePull("pul"), "pull, snr_pull, renoise"),
    (lambda: PredictedImagePull("pull", scale=1.5), "scale"),
    (lambda: PredictedImageGradient(objective="realism"), "classifier_log_prob, norm"),
])
def test_bad_configs(make, word):
    with pytest.raises(ConfigError, match=word):
        make()
