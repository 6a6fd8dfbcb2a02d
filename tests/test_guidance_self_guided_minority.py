"""Self-guided minority guidance (Um & Ye 2024, methods.md §3.3): the direction against its closed form for a
linear denoiser, the re-noising level and noise stream, Monte-Carlo averaging, normalisation, gating by ``every``."""

import math

import pytest
import torch

from guidance_stubs import SHAPE, LinearDenoiser, batch, make_ctx, make_process
from tailgen.diffusion import ReplayNoise, SeededNoise
from tailgen.guidance import GuidanceStack, SelfGuidedMinorityGuidance
from tailgen.guidance.base import max_normalized
from tailgen.sampling import SamplingRun, sample_ddpm
from tailgen.utils import ConfigError

LABELS = torch.tensor([0, 1, 2, 3])


def linear_x0(process, i, den, x, labels):
    """x0_hat for eps = a x + shift[y]: c x - d shift (float64), and c."""
    abar = float(process.alphas_cumprod[i])
    c = (1 - math.sqrt(1 - abar) * den.a) / math.sqrt(abar)
    return c * x.double() - math.sqrt(1 - abar) / math.sqrt(abar) * den.shift[labels].double(), c


def closed_form(process, i, den, x, zs):
    """Unnormalised gradient: c * mean_m (x0 - x0_tilde_m) / ||x0 - x0_tilde_m|| (x0_tilde detached)."""
    p = int(process.num_steps * 0.8)
    x0, c = linear_x0(process, i, den, x, LABELS)
    abar_p = float(process.alphas_cumprod[p])
    total = 0
    for z in zs:
        x_p = math.sqrt(abar_p) * x0 + math.sqrt(1 - abar_p) * z.double()
        err = x0 - linear_x0(process, p, den, x_p, LABELS)[0]
        total = total + err / err.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    return c * total / len(zs)


@pytest.mark.parametrize("i", [2, 6, 9])
def test_direction_closed_form_and_calls(i):
    den, x, z = LinearDenoiser(a=0.3), batch(), batch(seed=5)
    ctx = make_ctx(x, i=i, labels=LABELS, denoiser=den, noise=ReplayNoise(batch(), [], extras=[z]))
    g = SelfGuidedMinorityGuidance(normalize=False).direction(ctx)
    want = closed_form(ctx.process, i, den, x, [z])
    torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-6)
    # two network calls: x0_hat(x_t) at i, then the re-noised copy at p = floor(0.8 K) = 8, same labels
    assert [c[0] for c in den.calls] == [i, 8] and all(torch.equal(c[1], LABELS) for c in den.calls)
    assert ctx.noise.used_extras == 1


def test_normalized_direction_has_unit_peak_and_the_same_orientation():
    den, x, z = LinearDenoiser(a=0.3), batch(), batch(seed=5)
    ctx = make_ctx(x, i=4, labels=LABELS, denoiser=den, noise=ReplayNoise(batch(), [], extras=[z]))
    g = SelfGuidedMinorityGuidance().direction(ctx)
    want = closed_form(ctx.process, 4, den, x, [z])
    torch.testing.assert_close(g.double(), want / want.flatten(1).abs().amax(1).reshape(-1, 1, 1, 1),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g.flatten(1).abs().amax(1), torch.ones(4))


def test_monte_carlo_average_over_num_noise():
    den, x, zs = LinearDenoiser(a=0.3), batch(), [batch(seed=5), batch(seed=6), batch(seed=7)]
    ctx = make_ctx(x, i=3, labels=LABELS, denoiser=den, noise=ReplayNoise(batch(), [], extras=zs))
    g = SelfGuidedMinorityGuidance(num_noise=3, normalize=False).direction(ctx)
    torch.testing.assert_close(g.double(), closed_form(ctx.process, 3, den, x, zs), rtol=1e-4, atol=1e-6)
    assert ctx.noise.used_extras == 3


def test_score_is_the_reconstruction_distance():
    den, x, z = LinearDenoiser(a=0.3), batch(), batch(seed=5)
    ctx = make_ctx(x, i=5, labels=LABELS, denoiser=den, noise=ReplayNoise(batch(), [], extras=[z]))
    x0 = linear_x0(ctx.process, 5, den, x, LABELS)[0].float()
    x_p = ctx.process.q_sample(x0, 8, z)
    want = (x0 - linear_x0(ctx.process, 8, den, x_p, LABELS)[0]).flatten(1).norm(dim=1)
    torch.testing.assert_close(SelfGuidedMinorityGuidance().minority_score(ctx, x0).double(), want,
                               rtol=1e-4, atol=1e-6)


def test_renoise_index():
    g = SelfGuidedMinorityGuidance(renoise_ratio=0.8)
    assert [g.renoise_index(k) for k in (10, 50, 250)] == [8, 40, 200]
    assert SelfGuidedMinorityGuidance(renoise_ratio=0.999).renoise_index(10) == 9


def test_stack_mean_shift_every_kth_step_only():
    """Through the stack on DDPM: w * normalised g on steps 0, 2, 4, ... and nothing (no noise drawn) between."""
    process = make_process(10)
    g = SelfGuidedMinorityGuidance(scale=0.4, every=2)
    for step in range(10):
        i = 9 - step
        z = batch(seed=20 + step)
        den = LinearDenoiser(a=0.3)
        ctx = make_ctx(batch(), i=i, process=process, labels=LABELS, denoiser=den,
                       noise=ReplayNoise(batch(), [], extras=[z]))
        shift = GuidanceStack([g]).mean_gradient(ctx)
        if step % 2:
            assert shift is None and ctx.noise.used_extras == 0 and den.calls == []
        else:
            want = 0.4 * max_normalized(closed_form(process, i, den, ctx.x, [z]))
            torch.testing.assert_close(shift.double(), want, rtol=1e-4, atol=1e-6)


def test_needs_a_noise_source():
    ctx = make_ctx(batch(), i=3, labels=LABELS, noise=None)
    with pytest.raises(ConfigError, match="noise source"):
        SelfGuidedMinorityGuidance().direction(ctx)


@pytest.mark.parametrize("kwargs,word", [({"renoise_ratio": 1.0}, "renoise_ratio"), ({"num_noise": 0}, "num_noise"),
                                         ({"every": 0}, "every")])
def test_bad_configs(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        SelfGuidedMinorityGuidance(**kwargs)


def test_sampling_is_per_sample_whatever_the_batch():
    """Through the DDPM loop: the re-noising draws and the normalisation are per sample, so the image for a seed
    does not depend on the batch it is sampled in (SeededNoise contract), and the guidance does change it."""
    process, den = make_process(10), LinearDenoiser(a=0.3, log_var=-3.0)
    g = SelfGuidedMinorityGuidance(scale=0.5, every=2)

    def run(seeds, labels, guidance):
        noise = SeededNoise(seeds)
        return sample_ddpm(SamplingRun(den, guidance=guidance, noise=noise), noise.initial((len(seeds), *SHAPE)),
                           process, labels)

    full = run([0, 1, 2, 3], LABELS, [g])
    torch.testing.assert_close(run([2], LABELS[2:3], [g])[0], full[2])
    assert (run([0, 1, 2, 3], LABELS, []) - full).abs().amax() > 1e-2
