"""CADS (Sadat et al., ICLR 2024): the class-embedding path of the networks and the adapter, the annealing
schedule, the rescaling, the noisy-condition formula, and that inactive CADS changes no sample bit."""

import math

import pytest
import torch

from guidance_stubs import LinearDenoiser, batch, make_ctx, make_process
from tailgen.diffusion import ADMDenoiser, DiffusionProcess, ReplayNoise, SeededNoise
from tailgen.guidance import CADS, Guidance, GuidanceStack
from tailgen.guidance.cads import cads_gamma, rescale_condition
from tailgen.models.adm import create_model
from tailgen.models.toy import ToyDenoiser
from tailgen.sampling import SamplingRun, sample_ddpm
from tailgen.utils import ConfigError

LABELS = torch.tensor([0, 3, 1, 4])


def random_unet(seed: int = 0):
    """A small class-conditional learned-sigma UNet with random (not zero-initialised) weights."""
    torch.manual_seed(seed)
    net = create_model(image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                       attention_resolutions="4", learn_sigma=True, class_cond=True, num_classes=5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def unet():
    return random_unet()


def process(steps="6"):
    return DiffusionProcess.from_flags(noise_schedule="cosine", learn_sigma=True, timestep_respacing=steps)


class IdentityCondition(Guidance):
    """Takes the class-embedding path without changing the embedding."""

    def guide_condition(self, ctx, emb, w):
        return emb


# ------------------------------------------------------------------------------------------ embedding path


def test_unet_embedding_path_equals_label_path(unet):
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([999, 500, 10, 0])
    with torch.no_grad():
        by_label = unet(x, t, LABELS)
        emb = unet.class_embedding(LABELS)
        by_emb = unet(x, t, class_emb=emb)
        other = unet(x, t, class_emb=emb + 0.5)
    assert emb.shape == (4, 128)
    assert torch.equal(by_label, by_emb)
    assert not torch.allclose(by_label, other)  # the embedding is really used


def test_toy_embedding_path_equals_label_path():
    torch.manual_seed(0)
    net = ToyDenoiser(precondition=True)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn_like(p))
        x, t, y = torch.randn(3, 2), torch.tensor([900, 300, 5]), torch.tensor([0, 2, 3])  # 3 = null label
        assert torch.equal(net(x, t, y), net(x, t, class_emb=net.class_embedding(y)))
        assert torch.equal(net(x, t), net(x, t, class_emb=net.class_embedding(torch.full((3,), 3))))


def test_adapter_and_stack_embedding_path_equal_label_path(unet):
    p = process()
    den = ADMDenoiser(unet, p)
    x = torch.randn(4, 1, 8, 8)
    a, b = den(x, 3, LABELS), den(x, 3, class_emb=den.class_embedding(LABELS))
    assert torch.equal(a.eps, b.eps) and torch.equal(a.log_var, b.log_var)
    with pytest.raises(ConfigError, match="not both"):
        den(x, 3, LABELS, class_emb=den.class_embedding(LABELS))
    plain = GuidanceStack([]).predict(make_ctx(x, i=3, process=p, labels=LABELS, denoiser=den))
    via_emb = GuidanceStack([IdentityCondition()]).predict(make_ctx(x, i=3, process=p, labels=LABELS, denoiser=den))
    assert torch.equal(plain.eps, via_emb.eps) and torch.equal(plain.x0, via_emb.x0)


def test_network_rejects_bad_embeddings(unet):
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="shape"):
        unet(x, 5, class_emb=torch.zeros(2, 7))
    with pytest.raises(ConfigError, match="not both"):
        unet(x, 5, torch.tensor([0, 1]), class_emb=torch.zeros(2, 128))
    uncond = create_model(image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                          attention_resolutions="4", class_cond=False)
    with pytest.raises(ConfigError, match="unconditional"):
        uncond.class_embedding(torch.tensor([0]))


# ------------------------------------------------------------------------------------------ the maths


def test_gamma_schedule():
    assert [cads_gamma(t, 0.6, 0.9) for t in (0.0, 0.6, 0.75, 0.9, 1.0)] == pytest.approx([1, 1, 0.5, 0, 0])
    assert cads_gamma(0.66, 0.6, 0.9) == pytest.approx(0.8)
    taus = [k / 100 for k in range(101)]
    values = [cads_gamma(t, 0.2, 0.5) for t in taus]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone non-increasing in t
    assert CADS(tau1=0.3, tau2=0.4).gamma(0.35) == pytest.approx(0.5)


def test_rescaling_restores_the_clean_mean_and_std():
    g = torch.Generator().manual_seed(0)
    clean = 2.0 * torch.randn(5, 64, generator=g) + torch.linspace(-1, 1, 5)[:, None]
    noisy = 0.3 * clean + 3.0 * torch.randn(5, 64, generator=g) - 4.0
    out = rescale_condition(noisy, clean, psi=1.0)
    torch.testing.assert_close(out.mean(1), clean.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(1), clean.std(1), atol=1e-5, rtol=1e-5)
    # the shape of the noisy vector is kept: out is an affine function of noisy, per sample
    z = (noisy - noisy.mean(1, keepdim=True)) / noisy.std(1, keepdim=True)
    torch.testing.assert_close(out, z * clean.std(1, keepdim=True) + clean.mean(1, keepdim=True))
    assert torch.equal(rescale_condition(noisy, clean, psi=0.0), noisy)
    torch.testing.assert_close(rescale_condition(noisy, clean, psi=0.25), 0.25 * out + 0.75 * noisy)
    # a pure multiple of the clean vector is restored exactly
    torch.testing.assert_close(rescale_condition(0.4 * clean, clean, psi=1.0), clean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("psi", [0.0, 0.5, 1.0])
def test_noisy_condition_formula(psi):
    n = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    emb = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    p = make_process(20)
    ctx = make_ctx(batch(), i=16, process=p, labels=LABELS, noise=ReplayNoise(batch(), [], extras=[n]))
    cads = CADS(scale=0.7, tau1=0.6, tau2=0.9, psi=psi)
    gamma = cads.gamma(ctx.tau)
    assert 0 < gamma < 1 and cads.active(ctx)
    y_hat = math.sqrt(gamma) * emb + 0.7 * math.sqrt(1 - gamma) * n
    mu, sd = y_hat.mean(1, keepdim=True), y_hat.std(1, keepdim=True)
    want = psi * ((y_hat - mu) / sd * emb.std(1, keepdim=True) + emb.mean(1, keepdim=True)) + (1 - psi) * y_hat
    torch.testing.assert_close(cads.guide_condition(ctx, emb, 0.7), want)


def test_gamma_zero_gives_a_random_condition_and_no_noise_gives_the_clean_one():
    emb = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    p = make_process(20)
    zeros = ReplayNoise(batch(), [], extras=[torch.zeros(4, 128)])
    ctx = make_ctx(batch(), i=16, process=p, labels=LABELS, noise=zeros)
    torch.testing.assert_close(CADS(psi=1.0).guide_condition(ctx, emb, 0.25), emb, atol=1e-5, rtol=1e-5)
    n = torch.randn(4, 128, generator=torch.Generator().manual_seed(5))
    ctx = make_ctx(batch(), i=19, process=p, labels=LABELS, noise=ReplayNoise(batch(), [], extras=[n]))
    assert ctx.tau >= 0.9  # gamma = 0: the condition is the (rescaled) noise, independent of y
    out = CADS(psi=1.0).guide_condition(ctx, emb, 0.25)
    z = (n - n.mean(1, keepdim=True)) / n.std(1, keepdim=True)
    torch.testing.assert_close(out, z * emb.std(1, keepdim=True) + emb.mean(1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_active_only_where_gamma_below_one_and_in_the_window():
    p = make_process(20)
    ctxs = [make_ctx(batch(), i=i, process=p) for i in range(20)]
    cads = CADS(tau1=0.6, tau2=0.9)
    assert [cads.active(c) for c in ctxs] == [c.tau > 0.6 for c in ctxs]
    assert not any(CADS(scale=0.0).active(c) for c in ctxs)
    assert [CADS(t_max=0.8).active(c) for c in ctxs] == [0.6 < c.tau <= 0.8 for c in ctxs]


# ------------------------------------------------------------------------------------------ sampling


def run(unet, seeds, labels, guidance=()):
    p = process("8")
    noise = SeededNoise(seeds)
    x = noise.initial((len(seeds), 1, 8, 8))
    return sample_ddpm(SamplingRun(ADMDenoiser(unet, p), guidance=list(guidance), noise=noise), x, p,
                       torch.tensor(labels))


def test_inactive_cads_gives_bit_identical_samples(unet):
    base = run(unet, [1, 2, 3], [0, 1, 2])
    for off in (CADS(scale=0.0), CADS(scale=1.0, t_max=0.5), CADS(scale=1.0, tau1=0.999, tau2=1.0)):
        assert torch.equal(run(unet, [1, 2, 3], [0, 1, 2], [off]), base)
    on = run(unet, [1, 2, 3], [0, 1, 2], [CADS(scale=1.0)])
    assert torch.isfinite(on).all() and not torch.allclose(on, base)


def test_cads_samples_are_batch_invariant(unet):
    alone = run(unet, [7], [3], [CADS(scale=0.5)])
    batched = run(unet, [5, 7, 9], [1, 3, 0], [CADS(scale=0.5)])
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=0)


def test_errors():
    with pytest.raises(ConfigError, match="tau1"):
        CADS(tau1=0.9, tau2=0.6)
    with pytest.raises(ConfigError, match="psi"):
        CADS(psi=1.5)
    with pytest.raises(ConfigError, match="scale"):
        CADS(scale=-1.0)
    p = make_process(20)
    with pytest.raises(ConfigError, match="labels"):
        GuidanceStack([CADS()]).predict(make_ctx(batch(), i=18, process=p, labels=None))
    with pytest.raises(ConfigError, match="class_embedding"):  # a denoiser without a class embedding
        GuidanceStack([CADS()]).predict(make_ctx(batch(), i=18, process=p, labels=LABELS, denoiser=LinearDenoiser()))
