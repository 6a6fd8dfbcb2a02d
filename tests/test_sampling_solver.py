"""DPM-Solver++(2M) and DDIM against a closed-form answer.

Data x0 ~ N(mu, s^2 I). For the discrete VP process, E[x0 | x_t] = mu + s^2 sqrt(abar) / v (x_t - sqrt(abar) mu)
with v = abar s^2 + 1 - abar, so the exact denoiser is known. The probability-flow ODE keeps the standardised
variable fixed: x_abar = sqrt(abar) mu + sqrt(v / v_T) (x_T - sqrt(abar_T) mu). Both samplers end with
x0_hat at the last kept step (t = 0), so the exact answer is E[x0 | x_{t=0}] on the ODE solution."""

import math

import pytest
import torch

from tailgen.diffusion import DiffusionProcess, Prediction
from tailgen.sampling import SamplingRun, sample_ddim, sample_dpmpp_2m

S = 0.5
MU = torch.linspace(-0.5, 0.5, 64, dtype=torch.float64)


def x0_hat(x, abar):
    return MU + S * S * math.sqrt(abar) / (abar * S * S + 1 - abar) * (x - math.sqrt(abar) * MU)


def gaussian_denoiser(process):
    def denoise(x, i, labels=None):
        abar = float(process.alphas_cumprod[i])
        return Prediction(eps=(x - math.sqrt(abar) * x0_hat(x, abar)) / math.sqrt(1 - abar))
    return denoise


def ode_solution(process, x_T, abar):
    abar_T = float(process.alphas_cumprod[-1])
    v, v_T = abar * S * S + 1 - abar, abar_T * S * S + 1 - abar_T
    return math.sqrt(abar) * MU + math.sqrt(v / v_T) * (x_T - math.sqrt(abar_T) * MU)


def errors(schedule, K, lower_order_final=True):
    """Max abs error of (DDIM, DPM-Solver++ 2M) over 256 samples, and the solver's worst intermediate error."""
    p = DiffusionProcess.from_flags(noise_schedule=schedule, timestep_respacing=str(K))
    abar_T, abar_0 = float(p.alphas_cumprod[-1]), float(p.alphas_cumprod[0])
    z = torch.randn(256, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_T = math.sqrt(abar_T) * MU + math.sqrt(abar_T * S * S + 1 - abar_T) * z
    exact = x0_hat(ode_solution(p, x_T, abar_0), abar_0)
    inter = []
    track = lambda d: d["i"] > 0 and inter.append(
        (d["x"] - ode_solution(p, x_T, float(p.alphas_cumprod[d["i"] - 1]))).abs().max().item())
    ddim = sample_ddim(SamplingRun(gaussian_denoiser(p), clip_denoised=False), x_T.clone(), p)
    dpm = sample_dpmpp_2m(SamplingRun(gaussian_denoiser(p), clip_denoised=False, callback=track), x_T.clone(), p,
                          lower_order_final=lower_order_final)
    return (ddim - exact).abs().max().item(), (dpm - exact).abs().max().item(), max(inter)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_pure_2m_converges_second_order_and_beats_ddim(schedule):
    """Lu et al. Alg. 2 as published (2nd order up to the last kept step)."""
    steps = [50, 100, 200, 400]
    table = {K: errors(schedule, K, lower_order_final=False) for K in steps}
    ddim, dpm = [table[K][0] for K in steps], [table[K][1] for K in steps]
    # error decreases with the step count: ~4x per doubling (2nd order) for the solver, ~2x for DDIM (1st order)
    for a, b in zip(dpm[1:], dpm[2:]):
        assert 3.0 < a / b < 5.0, table
    for a, b in zip(ddim, ddim[1:]):
        assert 1.7 < a / b < 2.3, table
    assert all(b < a for a, b in zip(dpm, dpm[1:])), table
    # at equal steps the solver wins from 100 steps on, by a growing factor
    assert all(table[K][1] < table[K][0] for K in steps[1:]), table
    assert table[400][0] / table[400][1] > 8, table
    assert table[400][2] < 2e-3, table  # the whole trajectory follows the exact ODE solution


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_default_solver_beats_ddim_at_every_step_count(schedule):
    """Default (first-order step into t = 0): much better at the step counts people use."""
    steps = [10, 20, 50, 100, 200]
    table = {K: errors(schedule, K) for K in steps}
    dpm = [table[K][1] for K in steps]
    assert all(b < a for a, b in zip(dpm, dpm[1:])), table  # decreasing with the step count
    assert all(table[K][0] > table[K][1] for K in steps), table  # better than DDIM at equal steps ...
    assert all(table[K][0] > 2.5 * table[K][1] for K in steps[1:]), table  # ... by 2.5x or more from 20 steps
    assert table[50][0] > 10 * table[50][1] and table[200][1] < 3e-3, table


def test_solver_first_step_is_ddim_and_draws_no_noise():
    p = DiffusionProcess.from_flags(noise_schedule="cosine", timestep_respacing="20")
    x = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    class NoNoise:
        def step(self, like):
            raise AssertionError("the ODE solver must not draw noise")

    first = {}
    sample_dpmpp_2m(SamplingRun(gaussian_denoiser(p), clip_denoised=False, noise=NoNoise(),
                                callback=lambda d: first.setdefault("dpm", d["x"].clone())), x.clone(), p)
    sample_ddim(SamplingRun(gaussian_denoiser(p), clip_denoised=False,
                            callback=lambda d: first.setdefault("ddim", d["x"].clone())), x.clone(), p)
    torch.testing.assert_close(first["dpm"], first["ddim"], atol=1e-6, rtol=1e-6)
