"""BiNoising (Mei et al. 2022, methods.md §7) on closed-form Gaussian models: per label, data x0 ~ N(m, s^2 I), so
E[x0 | x_t] and the exact reverse kernel are known. The re-noise + unconditional step maps the conditional marginal
to the closed-form Gaussian, leaves the unconditional marginal invariant, follows its formula draw for draw, stays
inside its window, and needs an unconditional model."""

from __future__ import annotations

import math

import pytest
import torch

from guidance_stubs import make_ctx
from tailgen.diffusion import DiffusionProcess, Prediction, ReplayNoise, TorchNoise
from tailgen.guidance import BiNoising, GuidanceStack
from tailgen.utils import ConfigError

N, D = 20000, 8
NULL = 2
MEAN = {0: 0.5, 1: -0.4, NULL: -0.2}  # label -> data mean m (every dimension); NULL = the unconditional model
STD = {0: 0.3, 1: 0.5, NULL: 0.6}


def process() -> DiffusionProcess:
    return DiffusionProcess.from_flags(noise_schedule="cosine", timestep_respacing="20")


class GaussianModel:
    """Exact eps and reverse variance of x0 | y ~ N(MEAN[y], STD[y]^2 I); records the labels of every call."""

    def __init__(self, p: DiffusionProcess):
        self.p, self.calls = p, []

    def posterior(self, x, i, labels):
        abar = float(self.p.alphas_cumprod[i])
        m = torch.tensor([MEAN[int(y)] for y in labels], dtype=x.dtype).view(-1, *[1] * (x.dim() - 1))
        s2 = torch.tensor([STD[int(y)] ** 2 for y in labels], dtype=x.dtype).view_as(m)
        v = abar * s2 + 1 - abar
        k = math.sqrt(abar) * s2 / v
        return m + k * (x - math.sqrt(abar) * m), s2 * (1 - abar) / v  # E[x0 | x_t], Var[x0 | x_t]

    def __call__(self, x, i, labels=None):
        self.calls.append(None if labels is None else labels.clone())
        abar = float(self.p.alphas_cumprod[i])
        x0, var0 = self.posterior(x, i, labels)
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        var = float(self.p.posterior_variance[i]) + float(self.p.posterior_mean_coef1[i]) ** 2 * var0
        return Prediction(eps=eps, log_var=torch.log(var).expand_as(x) if i > 0 else None)


def marginal(p: DiffusionProcess, abar: float, label: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return math.sqrt(abar) * MEAN[label] + math.sqrt(abar * STD[label] ** 2 + 1 - abar) * torch.randn(
        N, D, generator=g, dtype=torch.float64)


def step(i: int, x_prev: torch.Tensor, scale: float = 1.0, seed: int = 1):
    p = process()
    model = GaussianModel(p)
    ctx = make_ctx(x_prev, i=i, process=p, labels=torch.zeros(len(x_prev), dtype=torch.long), denoiser=model,
                   noise=TorchNoise(torch.Generator().manual_seed(seed)))
    return BiNoising(scale=scale, null_label=NULL, clip_denoised=False).after_step(ctx, x_prev, scale), model


@pytest.mark.parametrize("i", [3, 12])
def test_conditional_marginal_goes_to_the_closed_form_gaussian(i):
    """x_{i-1} ~ p_c(x_{i-1}) -> re-noise -> exact unconditional step: a Gaussian with closed-form mean and variance."""
    p = process()
    abar, abar_prev, beta = (float(p.alphas_cumprod[i]), float(p.alphas_cumprod_prev[i]), float(p.betas[i]))
    x_prev = marginal(p, abar_prev, 0, seed=0)
    out, model = step(i, x_prev)
    assert all(torch.equal(c, torch.full((N,), NULL)) for c in model.calls) and len(model.calls) == 1
    # x~ = sqrt(1 - beta) x_prev + sqrt(beta) z: Gaussian with
    mu_re = math.sqrt(1 - beta) * math.sqrt(abar_prev) * MEAN[0]
    var_re = (1 - beta) * (abar_prev * STD[0] ** 2 + 1 - abar_prev) + beta
    # the exact unconditional step is affine in x~ plus Gaussian noise: out = a x~ + b + sigma z'
    s2u, mu = STD[NULL] ** 2, MEAN[NULL]
    k = math.sqrt(abar) * s2u / (abar * s2u + 1 - abar)
    c1, c2 = float(p.posterior_mean_coef1[i]), float(p.posterior_mean_coef2[i])
    a, b = c1 * k + c2, c1 * (1 - k * math.sqrt(abar)) * mu
    sigma2 = float(p.posterior_variance[i]) + c1 ** 2 * s2u * (1 - abar) / (abar * s2u + 1 - abar)
    want_mean, want_var = a * mu_re + b, a ** 2 * var_re + sigma2
    assert out.mean().item() == pytest.approx(want_mean, abs=4 * math.sqrt(want_var / out.numel()))
    assert out.var().item() == pytest.approx(want_var, rel=0.015)  # MC rel. std ~ 0.35 %
    # and it is not the conditional marginal it started from (the test can tell them apart)
    assert abs(want_mean - math.sqrt(abar_prev) * MEAN[0]) > 20 * math.sqrt(want_var / out.numel())


@pytest.mark.parametrize("i", [2, 10, 18])
def test_unconditional_marginal_is_invariant(i):
    """Forward re-noise then the exact reverse kernel of the same model: p_u(x_{i-1}) is a fixed point."""
    p = process()
    abar_prev = float(p.alphas_cumprod_prev[i])
    x_prev = marginal(p, abar_prev, NULL, seed=2)
    out, _ = step(i, x_prev, seed=3)
    want_var = abar_prev * STD[NULL] ** 2 + 1 - abar_prev
    assert out.mean().item() == pytest.approx(math.sqrt(abar_prev) * MEAN[NULL], abs=4 * math.sqrt(want_var / out.numel()))
    assert out.var().item() == pytest.approx(want_var, rel=0.015)
    assert (out - x_prev).abs().mean() > 0.1  # it did move every sample (a fresh draw, same law)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_step_formula_draw_for_draw(scale):
    """With recorded extra noise the output is the stated formula: re-noise, x0_hat_u, posterior mean, Sigma_u."""
    p = process()
    i = 7
    g = torch.Generator().manual_seed(4)
    x_prev, z1, z2 = (torch.randn(5, D, generator=g) for _ in range(3))
    labels = torch.tensor([0, 1, 0, 1, 1])
    model = GaussianModel(p)
    ctx = make_ctx(x_prev, i=i, process=p, labels=labels, denoiser=model, noise=ReplayNoise(x_prev, [], extras=[z1, z2]))
    out = BiNoising(scale=scale, null_label=NULL).after_step(ctx, x_prev, scale)
    beta = float(p.betas[i])
    x_re = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * z1
    x0 = model.posterior(x_re, i, torch.full((5,), NULL))[0].clamp(-1, 1)
    log_var = model(x_re, i, torch.full((5,), NULL)).log_var
    x_u = float(p.posterior_mean_coef1[i]) * x0 + float(p.posterior_mean_coef2[i]) * x_re + torch.exp(0.5 * log_var) * z2
    torch.testing.assert_close(out, x_prev + scale * (x_u - x_prev), atol=1e-5, rtol=1e-5)
    assert ctx.noise.used_extras == 2
    # the last step (i = 0) adds no noise (both draws are still consumed)
    ctx0 = make_ctx(x_prev, i=0, process=p, labels=labels, denoiser=model, noise=ReplayNoise(x_prev, [], extras=[z1, z1]))
    a = BiNoising(null_label=NULL).after_step(ctx0, x_prev, 1.0)
    ctx0b = make_ctx(x_prev, i=0, process=p, labels=labels, denoiser=model, noise=ReplayNoise(x_prev, [], extras=[z1, z2]))
    torch.testing.assert_close(a, BiNoising(null_label=NULL).after_step(ctx0b, x_prev, 1.0))
    assert ctx0b.noise.used_extras == 2


def test_steps_outside_the_window_leave_x_unchanged():
    p = process()
    x_prev = torch.randn(3, D, generator=torch.Generator().manual_seed(5))
    stack = GuidanceStack({"bn": BiNoising(null_label=NULL, t_max=0.4)})
    seen = {}
    for i in range(p.num_steps):
        model = GaussianModel(p)
        ctx = make_ctx(x_prev, i=i, process=p, labels=torch.zeros(3, dtype=torch.long), denoiser=model,
                       noise=TorchNoise(torch.Generator().manual_seed(i)))
        out = stack.after_step(ctx, x_prev)
        seen[i] = (ctx.tau <= 0.4, torch.equal(out, x_prev), len(model.calls), "bn" in ctx.terms)
    assert {active for active, *_ in seen.values()} == {True, False}  # the window splits the run
    for active, same, calls, recorded in seen.values():
        assert (same, calls, recorded) == ((False, 1, True) if active else (True, 0, False))
    # every k-th step and a zero scale turn it off as well
    ctx = make_ctx(x_prev, i=5, process=p, labels=torch.zeros(3, dtype=torch.long), denoiser=GaussianModel(p))
    assert torch.equal(GuidanceStack([BiNoising(null_label=NULL, every=2)]).after_step(ctx, x_prev), x_prev) == (ctx.step % 2 == 1)
    assert torch.equal(GuidanceStack([BiNoising(null_label=NULL, scale=0.0)]).after_step(ctx, x_prev), x_prev)


def test_needs_an_unconditional_model():
    with pytest.raises(ConfigError, match="unconditional"):
        BiNoising().validate(sampler="ddpm", has_classifier=False, has_uncond=False)
    BiNoising().validate(sampler="ddpm", has_classifier=False, has_uncond=True)
    BiNoising(null_label=10).validate(sampler="ddim", has_classifier=False, has_uncond=False)
    p = process()
    x = torch.randn(2, D)
    with pytest.raises(ConfigError, match="model.init_args.unconditional"):
        BiNoising().after_step(make_ctx(x, i=4, process=p, denoiser=GaussianModel(p)), x, 1.0)
    # a separate unconditional model is called without labels; the conditional network is not called
    cond, uncond = GaussianModel(p), GaussianModel(p)
    ctx = make_ctx(x, i=4, process=p, denoiser=cond, uncond=lambda x_, i_: uncond(x_, i_, torch.full((len(x_),), NULL)),
                   noise=TorchNoise(torch.Generator().manual_seed(0)))
    BiNoising().after_step(ctx, x, 1.0)
    assert cond.calls == [] and len(uncond.calls) == 1
    for bad in ({"scale": -0.5}, {"null_label": -1}, {"null_label": 1.5}):
        with pytest.raises(ConfigError, match="BiNoising"):
            BiNoising(**bad)


def test_module_without_unconditional_path_is_refused_and_null_label_samples():
    from tailgen.models.spec import NetworkSpec
    from tailgen.module.guided import GuidedDiffusion

    torch.set_num_threads(1)
    with pytest.raises(ConfigError, match="BiNoising needs an unconditional model"):
        GuidedDiffusion(NetworkSpec("fashion_diffusion"), guidances={"bn": BiNoising()}, progress=False)
    kwargs = dict(diffusion={"timestep_respacing": "4"}, progress=False, check_samples=False)
    plain = GuidedDiffusion(NetworkSpec("fashion_diffusion"), **kwargs)
    guided = GuidedDiffusion(NetworkSpec("fashion_diffusion"), guidances={"bn": BiNoising(null_label=10)}, **kwargs)
    labels, seeds = torch.tensor([0, 7]), torch.tensor([11, 12])
    terms = []
    a = plain.sample(labels, seeds)
    b = guided.sample(labels, seeds, callback=lambda info: terms.append(dict(info["terms"])))
    assert b.shape == (2, 1, 28, 28) and torch.isfinite(b).all() and not torch.equal(a, b)
    assert len(terms) == 4 and all("bn" in t for t in terms)
