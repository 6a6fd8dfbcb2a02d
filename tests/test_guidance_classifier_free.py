"""Classifier-free guidance: identity at w=0, the (1+w) eps_c - w eps_u formula on both unconditional paths."""

import re

import pytest
import torch

from guidance_stubs import LinearDenoiser, batch, make_ctx
from tailgen.diffusion import Prediction
from tailgen.guidance import ClassifierFreeGuidance, GuidanceStack
from tailgen.utils import ConfigError

LABELS = torch.tensor([0, 1, 2, 3])


class Uncond:
    """A separate unconditional model: eps = b x (records calls)."""

    def __init__(self, b=-0.2):
        self.b, self.calls = b, 0

    def __call__(self, x, i):
        self.calls += 1
        return Prediction(eps=self.b * x, log_var=torch.full_like(x, 9.0))


def test_w0_is_identity_and_skips_the_second_call():
    den, unc, x = LinearDenoiser(), Uncond(), batch()
    ctx = make_ctx(x, labels=LABELS, denoiser=den, uncond=unc)
    eps = den(x, ctx.i, LABELS).eps
    assert torch.equal(ClassifierFreeGuidance(scale=1.0).guide_eps(ctx, eps, 0.0), eps)
    assert unc.calls == 0
    ctx = make_ctx(x, labels=LABELS, denoiser=den, uncond=unc)
    pred = GuidanceStack([ClassifierFreeGuidance(scale=0.0)]).predict(ctx, clip_denoised=False)
    torch.testing.assert_close(pred.eps, eps)


def test_formula_with_an_unconditional_model_keeps_the_conditional_variance():
    den, unc, x = LinearDenoiser(log_var=-3.0), Uncond(), batch()
    ctx = make_ctx(x, labels=LABELS, denoiser=den, uncond=unc, sampler="ddim")
    pred = GuidanceStack([ClassifierFreeGuidance(scale=2.0)]).predict(ctx, clip_denoised=False)
    eps_c, eps_u = den(x, ctx.i, LABELS).eps, unc(x, ctx.i).eps
    torch.testing.assert_close(pred.eps, 3.0 * eps_c - 2.0 * eps_u, rtol=1e-5, atol=1e-5)
    assert torch.all(pred.log_var == -3.0)


def test_formula_with_a_null_label():
    den, x = LinearDenoiser(num_labels=11), batch()
    ctx = make_ctx(x, labels=LABELS, denoiser=den, uncond=Uncond())
    g = ClassifierFreeGuidance(scale=0.5, null_label=10)
    eps_c = den(x, ctx.i, LABELS).eps
    out = g.guide_eps(ctx, eps_c, 0.5)
    assert torch.equal(den.calls[-1][1], torch.full((4,), 10))  # null label wins over ctx.uncond
    eps_u = den(x, ctx.i, torch.full((4,), 10)).eps
    torch.testing.assert_close(out, 1.5 * eps_c - 0.5 * eps_u)


def test_per_sample_weight_broadcasts():
    den, unc, x = LinearDenoiser(), Uncond(), batch()
    ctx = make_ctx(x, labels=LABELS, denoiser=den, uncond=unc)
    eps_c, eps_u = den(x, ctx.i, LABELS).eps, unc(x, ctx.i).eps
    w = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(-1, 1, 1, 1)
    out = ClassifierFreeGuidance().guide_eps(ctx, eps_c, w)
    torch.testing.assert_close(out, (1 + w) * eps_c - w * eps_u)


def test_needs_an_unconditional_path():
    msg = "CFG needs an unconditional path: set model.unconditional or the guidance's null_label"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        GuidanceStack([ClassifierFreeGuidance()]).validate(sampler="ddpm", has_classifier=False, has_uncond=False)
    with pytest.raises(ConfigError, match=re.escape(msg)):  # also at run time, without validate
        ClassifierFreeGuidance().guide_eps(make_ctx(batch(), labels=LABELS), batch(), 1.0)
    GuidanceStack([ClassifierFreeGuidance()]).validate(sampler="ddpm", has_classifier=False, has_uncond=True)
    GuidanceStack([ClassifierFreeGuidance(null_label=0)]).validate(sampler="ddim", has_classifier=False,
                                                                   has_uncond=False)
    assert ClassifierFreeGuidance().uses_uncond and not ClassifierFreeGuidance(null_label=3).uses_uncond


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_null_label(bad):
    with pytest.raises(ConfigError, match="null_label"):
        ClassifierFreeGuidance(null_label=bad)
