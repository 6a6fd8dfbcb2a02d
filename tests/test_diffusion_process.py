"""DiffusionProcess coefficients, flags, training terms, and the ADM adapters."""

import math

import numpy as np
import pytest
import torch

from tailgen.diffusion import ADMDenoiser, DiffusionProcess, NoisyClassifier
from tailgen.utils import ConfigError


def test_from_flags_defaults_and_pasted_model_flags():
    p = DiffusionProcess.from_flags()
    assert (p.num_steps, p.num_train_steps, p.learn_sigma, p.sigma_small) == (1000, 1000, False, False)
    assert p.timestep_map.tolist() == list(range(1000)) and p.betas[0] == pytest.approx(1e-4)  # linear
    pasted = DiffusionProcess.from_flags(  # a guided-diffusion flag dict: model flags are ignored
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=64, learn_sigma=True,
        noise_schedule="cosine", num_channels=192, num_head_channels=64, num_res_blocks=3, resblock_updown=True,
        use_new_attention_order=True, use_fp16=True, use_scale_shift_norm=True, timestep_respacing="ddim25")
    assert pasted.learn_sigma and pasted.num_steps == 25 and pasted.timestep_map[-1] == 960
    with pytest.raises(ConfigError, match="unknown diffusion flag.*diffusion_step\\b"):
        DiffusionProcess.from_flags(diffusion_step=1000)


def test_conversions_and_per_sample_index():
    p = DiffusionProcess.from_flags(noise_schedule="cosine", timestep_respacing="50")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    i = torch.tensor([0, 7, 20, 35])  # well-conditioned in float32 (abar not ~0)
    x_t = p.q_sample(x0, i, noise)
    torch.testing.assert_close(p.x0_from_eps(x_t, i, noise), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(p.eps_from_x0(x_t, i, x0), noise, atol=1e-4, rtol=1e-4)
    for b in range(4):  # a [B] index gives row b the coefficients of i[b]
        for f in (lambda k, s: p.q_sample(x0[s], k, noise[s]), lambda k, s: p.posterior_mean(x0[s], x_t[s], k),
                  lambda k, s: p.model_log_variance(k, noise[s], x_t[s])):
            assert torch.equal(f(i, slice(None))[b], f(int(i[b]), slice(b, b + 1))[0])


def test_posterior_and_variances():
    p = DiffusionProcess.from_flags(timestep_respacing="10")
    b, ac = p.betas, p.alphas_cumprod
    ac_prev = np.append(1.0, ac[:-1])
    post = b * (1 - ac_prev) / (1 - ac)
    x = torch.zeros(1, 3, 2, 2)
    # learned range: v = 1 -> log beta, v = -1 -> clipped log posterior variance (entry 0 = entry 1)
    assert torch.allclose(p.model_log_variance(5, torch.ones_like(x), x), torch.tensor(math.log(b[5])).float())
    assert torch.allclose(p.model_log_variance(0, -torch.ones_like(x), x), torch.tensor(math.log(post[1])).float())
    # fixed large: beta, except beta~_1 at i = 0; fixed small: beta~ (log clipped)
    assert p.model_log_variance(0, None, x).unique().item() == np.float32(math.log(post[1]))
    assert p.model_variance(3, None, x).unique().item() == np.float32(b[3])
    small = DiffusionProcess.from_flags(timestep_respacing="10", sigma_small=True)
    assert small.model_variance(3, None, x).unique().item() == np.float32(post[3])
    # posterior mean: q(x_{i-1} | x_i, x0) coefficients
    assert p.posterior_mean_coef1[4] == pytest.approx(b[4] * math.sqrt(ac_prev[4]) / (1 - ac[4]))
    assert p.posterior_mean_coef2[4] == pytest.approx((1 - ac_prev[4]) * math.sqrt(1 - b[4]) / (1 - ac[4]))


def test_vlb_term():
    p = DiffusionProcess.from_flags(noise_schedule="cosine", learn_sigma=True)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (4, 3, 8, 8), generator=g).float() / 127.5 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    i = torch.tensor([0, 1, 500, 999])
    x_t = p.q_sample(x0, i, noise)
    v = torch.full_like(x0, -1.0, requires_grad=True)  # model variance = posterior variance
    x0_exact = p.x0_from_eps(x_t, i, noise)  # exact eps -> exact posterior mean
    vb = p.vlb_term(x0, x_t, i, x0_exact, p.model_log_variance(i, v, x_t))
    assert vb.shape == (4,)
    assert vb[1:].abs().max() < 1e-3  # KL(q || p) = 0 when p = q
    assert vb[0] > 0 and torch.isfinite(vb[0])  # decoder NLL in bits per dim at i = 0
    vb_off = p.vlb_term(x0, x_t, i, x0_exact, p.model_log_variance(i, torch.zeros_like(x0), x_t))
    assert vb_off[1] > vb[1] + 1e-3  # another variance costs bits (where beta and beta~ differ)
    vb.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


class RecordingNet(torch.nn.Module):
    """Returns 2C channels (eps = x * 0.5, v = 0.25) and records what it was given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append((t, kwargs))
        return torch.cat([0.5 * x, torch.full_like(x, 0.25)], 1)


def test_adm_denoiser_maps_respaced_index_and_splits_sigma():
    p = DiffusionProcess.from_flags(noise_schedule="cosine", learn_sigma=True, timestep_respacing="ddim10")
    net, x, y = RecordingNet(), torch.randn(2, 3, 4, 4), torch.tensor([3, 5])
    pred = ADMDenoiser(net, p)(x, 9, y, low_res=torch.zeros(2, 3, 2, 2))
    t, kwargs = net.calls[-1]
    assert t.dtype == torch.int64 and t.tolist() == [900, 900]
    assert kwargs["y"] is y and kwargs["low_res"].shape == (2, 3, 2, 2)
    assert torch.equal(pred.eps, 0.5 * x)
    assert torch.equal(pred.log_var, p.model_log_variance(9, torch.full_like(x, 0.25), x))
    ADMDenoiser(net, p)(x, torch.tensor([1, 2]))
    assert net.calls[-1][0].tolist() == [100, 200] and "y" not in net.calls[-1][1]


def test_adm_denoiser_predict_xstart_fixed_sigma_and_rescaled_timesteps():
    p = DiffusionProcess.from_flags(diffusion_steps=4000, predict_xstart=True, rescale_timesteps=True,
                                    timestep_respacing="10")
    net = lambda x, t: (net.seen.append(t), x * 0.1)[1]
    net.seen = []
    x = torch.randn(2, 3, 4, 4)
    pred = ADMDenoiser(net, p)(x, 3)
    assert pred.log_var is None
    torch.testing.assert_close(p.x0_from_eps(x, 3, pred.eps), x * 0.1)  # x0 output converted to eps
    ADMDenoiser(net, p)(x, 9)
    assert net.seen[-1].dtype == torch.float32 and net.seen[-1].tolist() == [999.75, 999.75]  # 3999 * 1000 / 4000


def test_noisy_classifier_gets_original_timestep():
    p = DiffusionProcess.from_flags(timestep_respacing="10")
    seen = []
    clf = NoisyClassifier(lambda x, t: (seen.append(t), torch.zeros(len(x), 7))[1], p)
    assert clf(torch.randn(3, 3, 4, 4), 8).shape == (3, 7)
    assert seen[-1].dtype == torch.int64 and seen[-1].tolist() == [888] * 3
