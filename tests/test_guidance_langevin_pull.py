"""LangevinPull (tailgen's temperature-keeping x0_hat guidance) on the closed-form Gaussian case: data
x0 ~ N(0, diag(s^2)), exact eps_hat(x_t) = sqrt(1 - abar) x_t / v, v = abar s^2 + 1 - abar. One step keeps the exact
marginal variance (and the total variance for anisotropic data); a whole DDPM run keeps the unguided marginal
variance at every step, while the plain pull (f) shrinks it."""

import math

import pytest
import torch

from guidance_stubs import LinearDenoiser, batch, make_ctx
from tailgen.diffusion import DiffusionProcess, Prediction, ReplayNoise, TorchNoise
from tailgen.guidance import GuidanceStack, LangevinPull, PredictedImagePull
from tailgen.sampling import SamplingRun, sample_ddpm
from tailgen.utils import ConfigError

N, D = 4000, 64  # D large enough that eta m < 2 (no clamping) for every sample


def process(steps: str = "25") -> DiffusionProcess:
    return DiffusionProcess.from_flags(noise_schedule="cosine", timestep_respacing=steps, sigma_small=True)


class GaussianDenoiser:
    """The exact denoiser of x0 ~ N(0, diag(std^2)), with the exact reverse variance as its log_var, so that
    unguided DDPM has the true marginal N(0, abar s^2 + 1 - abar) at every step."""

    def __init__(self, p: DiffusionProcess, std: torch.Tensor):
        self.p, self.var, self.calls = p, std.double() ** 2, 0

    def marginal_var(self, i: int) -> torch.Tensor:
        abar = float(self.p.alphas_cumprod[i])
        return abar * self.var + 1 - abar

    def __call__(self, x, i, labels=None):
        self.calls += 1
        abar, v = float(self.p.alphas_cumprod[i]), self.marginal_var(i)
        eps = math.sqrt(1 - abar) * x / v.to(x)
        # Var(x_{i-1} | x_i) = beta~ + c1^2 Var(x0 | x_i), Var(x0 | x_i) = s^2 (1 - abar) / v
        c1 = float(self.p.posterior_mean_coef1[i])
        var = float(self.p.posterior_variance[i]) + c1 ** 2 * self.var * (1 - abar) / v
        log_var = torch.log(var).to(x).expand_as(x) if i > 0 else None
        return Prediction(eps=eps, log_var=log_var)


def gaussian_step(std, i, eta, seed=0):
    """x ~ N(0, v) at index i, then one LangevinPull step; returns (x, x', v, q)."""
    p = process()
    den = GaussianDenoiser(p, std)
    g = torch.Generator().manual_seed(seed)
    v = den.marginal_var(i)
    x = torch.randn(N, len(std), generator=g, dtype=torch.float64) * v.sqrt()
    ctx = make_ctx(x, i=i, process=p, denoiser=den, noise=TorchNoise(g))
    out = LangevinPull(scale=eta).before_model(ctx, x, eta)
    q = (1 - float(p.alphas_cumprod[i])) / v
    return x, out, v, q


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_one_step_keeps_the_gaussian_marginal_variance(eta):
    std = torch.full((D,), 0.5)
    i = 15  # abar ~ 0.19: q = (1 - abar) / v ~ 0.94
    x, out, v, q = gaussian_step(std, i, eta)
    ratio = (out.var(0) / v).mean().item()
    assert ratio == pytest.approx(1.0, abs=0.01)  # MC std of the ratio ~ 0.004
    assert out.mean(0).abs().max() < 0.05
    # the alternatives this step is built against, both far outside the tolerance:
    pull = (x + eta * (math.sqrt(float(process().alphas_cumprod[i])) * x0_hat(x, i, std) - x)).var(0) / v
    torch.testing.assert_close(pull.mean().item(), ((1 - eta * q) ** 2).mean().item(), atol=0.01, rtol=0)
    assert pull.mean() < 0.75  # the plain pull (f) at the same level shrinks the variance
    ula = (1 + eta ** 2 * q ** 2).mean().item()  # plain Langevin noise 2 delta over-disperses by eta^2 q^2
    assert ula - 1 > 0.05  # > 5x the tolerance above


def x0_hat(x, i, std):
    p = process()
    abar = float(p.alphas_cumprod[i])
    v = abar * std.double() ** 2 + 1 - abar
    return math.sqrt(abar) * std.double() ** 2 / v * x


def test_one_step_keeps_the_total_variance_of_anisotropic_data():
    std = torch.linspace(0.2, 1.5, D)
    x, out, v, q = gaussian_step(std, 14, 0.8, seed=1)
    assert out.var(0).sum().item() == pytest.approx(v.sum().item(), rel=0.01)
    # each dimension moves by eta^2 (1 - abar) (q_i - mean q) only (closed form, second order)
    abar = float(process().alphas_cumprod[14])
    want = v + 0.8 ** 2 * (1 - abar) * (q - q.mean())
    effect, err = (want - v).abs().mean(), (out.var(0) - want).abs().mean()  # per-dim MC noise ~ 2 % of v
    assert err < 0.3 * effect


def run_ddpm(guidance, std, steps="25", seed=0):
    p = process(steps)
    den = GaussianDenoiser(p, std)
    gen = torch.Generator().manual_seed(seed)
    noise = TorchNoise(gen)
    variances = []
    x = noise.initial((N, len(std)))
    run = SamplingRun(den, guidance=guidance, noise=noise, clip_denoised=False,
                      callback=lambda s: variances.append(s["x"].var(0).mean().item()))
    out = sample_ddpm(run, x, p, None)
    return out, variances, den


def test_ddpm_keeps_the_unguided_marginal_variance_while_the_plain_pull_shrinks_it():
    std = torch.full((D,), 0.5)
    base, base_steps, den = run_ddpm([], std)
    truth = [den.marginal_var(i - 1).mean().item() if i else 0.25 for i in range(24, -1, -1)]
    for a, b in zip(base_steps, truth):  # the exact-variance stub makes unguided DDPM exact
        assert a == pytest.approx(b, rel=0.02)
    for eta in (0.3, 1.0):
        guided, steps, den = run_ddpm([LangevinPull(scale=eta)], std)
        assert den.calls == 50  # one extra network call per step
        for a, b in zip(steps, base_steps):
            assert a == pytest.approx(b, rel=0.02)
        assert (guided.var(0) / base.var(0)).mean().item() == pytest.approx(1.0, abs=0.015)
    pulled, pulled_steps, _ = run_ddpm([PredictedImagePull("pull", scale=0.1)], std)
    assert (pulled.var(0) / base.var(0)).mean().item() < 0.7
    assert pulled_steps[-1] < 0.7 * base_steps[-1]


def test_step_formula_and_noise_stream():
    z = batch(seed=5)
    den = LinearDenoiser(a=0.4)
    labels = torch.tensor([0, 1, 2, 3])
    ctx = make_ctx(batch(), i=6, labels=labels, denoiser=den, noise=ReplayNoise(batch(), [], extras=[z]))
    x = ctx.x
    eps = den(x, 6, labels).eps
    abar = float(ctx.process.alphas_cumprod[6])
    m = eps.pow(2).flatten(1).mean(1).reshape(-1, 1, 1, 1)
    want = x - 0.2 * math.sqrt(1 - abar) * eps + torch.sqrt(0.2 * (1 - abar) * (2 - 0.2 * m)) * z
    got = GuidanceStack([LangevinPull(scale=0.2)]).predict(ctx).x
    torch.testing.assert_close(got, want)
    assert ctx.noise.used_extras == 1 and den.calls[-1][0] == 6 and torch.equal(den.calls[-2][1], labels)
    # the drift is the plain pull (f) at level t: eta (sqrt(abar) x0_hat - x)
    x0 = ctx.process.x0_from_eps(x, 6, eps)
    torch.testing.assert_close(-0.2 * math.sqrt(1 - abar) * eps, 0.2 * (math.sqrt(abar) * x0 - x))


def test_scale_bounds_and_off():
    with pytest.raises(ConfigError, match="eta"):
        LangevinPull(scale=1.5)
    ctx = make_ctx(batch(), i=3)
    assert not LangevinPull(scale=0.0).active(ctx)
