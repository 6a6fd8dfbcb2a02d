"""ADM classifier guidance and EDS: direction, the three forms through the stack, max_norm, validation."""

import math

import pytest
import torch

from guidance_stubs import LinearClassifier, LinearDenoiser, batch, make_ctx, make_process
from tailgen.guidance import ClassifierGuidance, EntropyScaledClassifierGuidance, GuidanceStack, LowDensityGuidance
from tailgen.utils import ConfigError

LABELS = torch.tensor([0, 1, 2, 4])


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def test_direction_is_grad_log_p_y():
    clf, x = LinearClassifier(), batch()
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    close(ClassifierGuidance(scale=2.0).direction(ctx), clf.grad_log_p(x, LABELS))
    close(ClassifierGuidance(scale=2.0).guided_gradient(ctx), 2.0 * clf.grad_log_p(x, LABELS))


def test_mean_form_on_ddpm():
    clf, x, den = LinearClassifier(), batch(), LinearDenoiser()
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf, denoiser=den, sampler="ddpm")
    stack = GuidanceStack([ClassifierGuidance(scale=1.5)])
    pred = stack.predict(ctx, clip_denoised=False)
    close(pred.eps, den(x, ctx.i, LABELS).eps)  # eps untouched: the shift goes to the mean
    close(stack.mean_gradient(ctx), 1.5 * clf.grad_log_p(x, LABELS))


def test_score_form_on_ddim():
    clf, x, den = LinearClassifier(), batch(), LinearDenoiser()
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf, denoiser=den, sampler="ddim")
    stack = GuidanceStack([ClassifierGuidance(scale=1.5)])
    pred = stack.predict(ctx, clip_denoised=False)
    abar = float(ctx.process.alphas_cumprod[ctx.i])
    eps = den(x, ctx.i, LABELS).eps - math.sqrt(1 - abar) * 1.5 * clf.grad_log_p(x, LABELS)
    close(pred.eps, eps)
    close(pred.x0, ctx.process.x0_from_eps(x, ctx.i, eps.float()))
    assert stack.mean_gradient(ctx) is None


def test_pre_form_moves_x_before_the_network():
    clf, x, den = LinearClassifier(), batch(), LinearDenoiser()
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf, denoiser=den, sampler="ddpm")
    pred = GuidanceStack([ClassifierGuidance(scale=0.7, form="pre")]).predict(ctx, clip_denoised=False)
    x_new = x + float(ctx.process.betas[ctx.i]) * 0.7 * clf.grad_log_p(x, LABELS)
    close(pred.x, x_new)
    close(den.calls[0][1].double(), LABELS.double())
    close(pred.eps, den(x_new.float(), ctx.i, LABELS).eps)


def test_one_classifier_forward_shared_by_guidances():
    clf, x = LinearClassifier(), batch()
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    stack = GuidanceStack([ClassifierGuidance(), LowDensityGuidance(variant="target"),
                           EntropyScaledClassifierGuidance()])
    stack.mean_gradient(ctx)
    assert len(clf.calls) == 1


def test_max_norm_caps_per_sample_rms():
    clf = LinearClassifier()
    x = torch.cat([batch(2), 1e-3 * batch(2, seed=5)])
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    raw = 50.0 * clf.grad_log_p(x, LABELS)
    rms = raw.flatten(1).norm(dim=1) / math.sqrt(raw[0].numel())
    cap = float(rms.median())
    g = ClassifierGuidance(scale=50.0, max_norm=cap).guided_gradient(ctx)
    g_rms = g.flatten(1).norm(dim=1) / math.sqrt(g[0].numel())
    for b in range(4):
        if rms[b] > cap:
            assert g_rms[b] == pytest.approx(cap, rel=1e-5)
            close(g[b] / g_rms[b], raw[b] / rms[b])  # same direction
        else:
            close(g[b], raw[b])


def test_eds_scale_is_log_c_over_entropy():
    clf, x = LinearClassifier(), batch()
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    p = clf.probs(x)
    want = math.log(5) / -(p * p.log()).sum(-1)
    eds = EntropyScaledClassifierGuidance(scale=0.75)
    close(eds.sample_scale(ctx), want)
    assert (eds.sample_scale(ctx) >= 1).all()
    close(eds.guided_gradient(ctx), 0.75 * want.view(-1, 1, 1, 1) * clf.grad_log_p(x, LABELS))


def test_eds_finite_on_a_saturated_classifier():
    clf, x = LinearClassifier(), batch(scale=1e3)
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    assert torch.isfinite(EntropyScaledClassifierGuidance().guided_gradient(ctx)).all()


def test_classifier_guidance_without_classifier_is_a_config_error():
    stack = GuidanceStack([ClassifierGuidance()])
    with pytest.raises(ConfigError, match="needs a noisy classifier"):
        stack.validate(sampler="ddpm", has_classifier=False, has_uncond=False)
    stack.validate(sampler="ddpm", has_classifier=True, has_uncond=False)


@pytest.mark.parametrize("cls", [ClassifierGuidance, EntropyScaledClassifierGuidance, LowDensityGuidance])
def test_mean_form_on_ddim_is_a_config_error(cls):
    with pytest.raises(ConfigError, match="form='mean' needs an ancestral sampler"):
        GuidanceStack([cls(form="mean")]).validate(sampler="ddim", has_classifier=True, has_uncond=False)
    GuidanceStack([cls(form="auto")]).validate(sampler="ddim", has_classifier=True, has_uncond=False)


def test_missing_labels_is_a_config_error():
    ctx = make_ctx(batch(), labels=None, noisy_classifier=LinearClassifier())
    with pytest.raises(ConfigError, match="needs class labels"):
        ClassifierGuidance().direction(ctx)


def test_process_fixture_is_respaced():
    p = make_process(10)
    assert p.num_steps == 10 and p.timestep_map[0] == 0 and p.alphas_cumprod_prev[0] == 1.0
