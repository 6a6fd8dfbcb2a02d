"""Low-density guidance (methods.md §4.1 (a)-(e)): each direction against an independent float64 autograd of
its literal objective, (a)'s identity and fixed point, (e) from both sides, and config errors."""

import math

import pytest
import torch

from guidance_stubs import LinearClassifier, batch, make_ctx, two_class_at
from tailgen.guidance import LowDensityGuidance
from tailgen.guidance.classifier import log_one_minus_p_y
from tailgen.utils import ConfigError

LABELS = torch.tensor([0, 1, 2, 4])


def literal_objective(clf, x64, y, variant, lam=0.7, gamma=2.0, c=0.4, space="prob"):
    """The variant's objective written naively in float64; its gradient is the expected direction."""
    p_all = clf.probs(x64)
    p = p_all[torch.arange(len(y)), y]
    if variant == "complement":
        return p.log() + lam * torch.log(1 - p)
    if variant == "negative":
        return -p.log()
    if variant == "entropy":
        return p.log() + lam * -(p_all * p_all.log()).sum(-1)
    if variant == "damped":
        return (1 - p.detach()) ** gamma * p.log()
    if space == "prob":
        return -(p - c) ** 2
    return -(p.log() - math.log(c)) ** 2


CASES = [("complement", "prob"), ("negative", "prob"), ("entropy", "prob"), ("damped", "prob"),
         ("target", "prob"), ("target", "log")]


@pytest.mark.parametrize("variant,space", CASES)
def test_direction_equals_autograd_of_the_literal_objective(variant, space):
    clf, x = LinearClassifier(), batch(scale=0.3)
    g = LowDensityGuidance(variant=variant, lam=0.7, gamma=2.0, target_confidence=0.4, target_space=space)
    d = g.direction(make_ctx(x, labels=LABELS, noisy_classifier=clf))
    x64 = x.double().requires_grad_(True)
    (want,) = torch.autograd.grad(literal_objective(clf, x64, LABELS, variant, space=space).sum(), x64)
    torch.testing.assert_close(d.double(), want, rtol=1e-4, atol=1e-6)


def test_closed_forms_of_the_multiplicative_variants():
    clf, x = LinearClassifier(), batch(scale=0.3)
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    g_y = clf.grad_log_p(x, LABELS)
    p = clf.probs(x)[torch.arange(4), LABELS].view(-1, 1, 1, 1)
    expect = {
        LowDensityGuidance(variant="negative"): -g_y,
        LowDensityGuidance(variant="damped", gamma=2.0): (1 - p) ** 2 * g_y,
        LowDensityGuidance(variant="target", target_confidence=0.3): -2 * (p - 0.3) * p * g_y,
        LowDensityGuidance(variant="target", target_confidence=0.3, target_space="log"): -2 * torch.log(p / 0.3) * g_y,
    }
    for guidance, want in expect.items():
        torch.testing.assert_close(guidance.direction(ctx).double(), want, rtol=1e-4, atol=1e-6)


def test_complement_identity_relative_and_absolute():
    """(a): s (g_y + lam grad log(1-p)) = (s - L p/(1-p)) g_y with L = s lam; p/(1-p) = exp(log p - log(1-p))."""
    clf, x = LinearClassifier(), batch(scale=0.3)
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    s, lam = 2.0, 0.25
    logits = x.double().flatten(1) @ clf.W.T + clf.b
    log_p = torch.log_softmax(logits, -1)[torch.arange(4), LABELS]
    ratio = torch.exp(log_p - log_one_minus_p_y(logits, LABELS)).view(-1, 1, 1, 1)
    g_y = clf.grad_log_p(x, LABELS)
    got = LowDensityGuidance(variant="complement", scale=s, lam=lam).guided_gradient(ctx).double()
    torch.testing.assert_close(got, (s - s * lam * ratio) * g_y, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got, s * (1 - lam * ratio) * g_y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_complement_fixed_point(lam):
    """The field vanishes at p* = 1/(1+lam), raises p below it and lowers p above it."""
    g = LowDensityGuidance(variant="complement", lam=lam)
    p_star = g.fixed_point
    assert p_star == pytest.approx(1 / (1 + lam))
    for q, sign in [(p_star, 0), (p_star * 0.6, 1), (p_star + 0.6 * (1 - p_star), -1)]:
        clf, x = two_class_at(q)
        ctx = make_ctx(x, labels=torch.tensor([0]), noisy_classifier=clf)
        assert clf.probs(x)[0, 0].item() == pytest.approx(q, rel=1e-5)
        d, g_y = g.direction(ctx).double(), clf.grad_log_p(x, torch.tensor([0]))
        along = (d * g_y).sum().item() / g_y.norm().item() ** 2  # = 1 - lam p/(1-p)
        assert along == pytest.approx(1 - lam * q / (1 - q), abs=1e-4)
        if sign == 0:
            assert d.norm().item() < 1e-4 * g_y.norm().item()
        else:
            assert math.copysign(1, along) == sign


def test_complement_stays_finite_where_p_saturates():
    clf, x = LinearClassifier(), batch(scale=200.0)
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    assert torch.isfinite(LowDensityGuidance(variant="complement", lam=1.0).direction(ctx)).all()


@pytest.mark.parametrize("space", ["prob", "log"])
@pytest.mark.parametrize("start", [0.15, 0.5, 0.9])
def test_target_pushes_p_toward_c_from_both_sides(space, start):
    c = 0.5
    clf, x = two_class_at(start)
    y = torch.tensor([0])
    d = LowDensityGuidance(variant="target", target_confidence=c, target_space=space).direction(
        make_ctx(x, labels=y, noisy_classifier=clf))
    if start == c:
        assert d.norm().item() < 1e-5
        return
    p_new = clf.probs(x + 1e-2 * d)[0, 0].item()
    assert abs(p_new - c) < abs(start - c)
    assert (p_new - start) * (c - start) > 0


def test_entropy_ascent_raises_entropy():
    clf, x = LinearClassifier(), batch(scale=0.3)
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    d = LowDensityGuidance(variant="entropy", lam=50.0).direction(ctx)  # dominated by grad H
    H = lambda z: -(clf.probs(z) * clf.probs(z).log()).sum(-1)
    assert (H(x + 1e-3 * d) > H(x)).all()


def test_variants_sharing_g_y_need_no_extra_backward():
    clf, x = LinearClassifier(), batch()
    ctx = make_ctx(x, labels=LABELS, noisy_classifier=clf)
    for v in ("negative", "damped", "target"):
        LowDensityGuidance(variant=v).direction(ctx)
    assert set(ctx.classifier_eval()._grads) == {"log_p_y"}
    LowDensityGuidance(variant="complement").direction(ctx)
    LowDensityGuidance(variant="entropy").direction(ctx)
    assert set(ctx.classifier_eval()._grads) == {"log_p_y", "log_1m_p_y", "entropy"}


def test_unknown_variant_lists_the_valid_names():
    with pytest.raises(ConfigError) as err:
        LowDensityGuidance(variant="compliment")
    for name in ("complement", "negative", "entropy", "damped", "target"):
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs,word", [
    ({"target_confidence": 1.0}, "target_confidence"), ({"target_confidence": 0.0}, "target_confidence"),
    ({"lam": -1.0}, "lam"), ({"gamma": -0.5}, "gamma"), ({"target_space": "logit"}, "target_space"),
    ({"form": "posterior"}, "form"), ({"max_norm": 0.0}, "max_norm"), ({"t_min": 0.8, "t_max": 0.2}, "t_min"),
])
def test_bad_options_are_config_errors(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        LowDensityGuidance(**kwargs)
