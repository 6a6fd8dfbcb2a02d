"""The samplers' arithmetic is bit-identical to guided-diffusion's p_sample / ddim_sample written out from the
fixtures README (5.3, 5.4, 5.5) with an independent float64 -> float32 coefficient table, for learned, fixed-large
and fixed-small variances, guided and unguided. A small deterministic network stands in for the UNet."""

import numpy as np
import pytest
import torch

from tailgen.diffusion import ADMDenoiser, DiffusionProcess, NoisyClassifier, ReplayNoise
from tailgen.guidance import GradientGuidance
from tailgen.sampling import SamplingRun, sample

SHAPE = (2, 3, 8, 8)


class TinyNet(torch.nn.Module):
    """A fixed, smooth function of (x, t, y) with ADM's output layout."""

    def __init__(self, out_channels):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(out_channels, 3, 3, 3, generator=g) * 0.3

    def forward(self, x, t, y=None):
        h = torch.nn.functional.conv2d(x, self.w, padding=1) * (1 + t.float().view(-1, 1, 1, 1) / 1000)
        return torch.tanh(h + (0 if y is None else 0.1 * y.float().view(-1, 1, 1, 1)))


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.randn(10, 3 * 8 * 8, generator=torch.Generator().manual_seed(1)) * 0.1

    def forward(self, x, t):
        return (x.flatten(1) @ self.w.T) * (2 - t.float().view(-1, 1) / 1000)


class ClassifierGuidance(GradientGuidance):
    uses_classifier = True

    def direction(self, ctx):
        return ctx.classifier_eval().grad_log_p_y


def reference_loop(betas, timestep_map, net, clf, kind, learn_sigma, sigma_small, guided, eta, x, noises, y):
    """guided-diffusion p_sample_loop / ddim_sample_loop, transcribed from the fixtures README."""
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_log = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = betas * np.sqrt(ac_prev) / (1.0 - ac), (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)
    recip, recipm1 = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1.0)
    fixed = (post_var, post_log) if sigma_small else (np.append(post_var[1], betas[1:]), np.log(np.append(post_var[1], betas[1:])))
    e = lambda arr, t: torch.from_numpy(arr)[t].float().view(-1, 1, 1, 1)
    seq = []
    for k, i in enumerate(range(len(betas) - 1, -1, -1)):
        t = torch.tensor([i] * x.shape[0])
        tm = torch.from_numpy(timestep_map)[t]
        out = net(x, tm, y)
        if learn_sigma:
            eps, v = torch.split(out, 3, dim=1)
            frac = (v + 1) / 2
            log_var = frac * e(np.log(betas), t) + (1 - frac) * e(post_log, t)
            var = torch.exp(log_var)
        else:
            eps, var, log_var = out, e(fixed[0], t), e(fixed[1], t)
        x0 = (e(recip, t) * x - e(recipm1, t) * eps).clamp(-1, 1)
        mean = e(coef1, t) * x0 + e(coef2, t) * x
        z, mask = noises[k], (t != 0).float().view(-1, 1, 1, 1)
        if guided:
            with torch.enable_grad():
                xi = x.detach().requires_grad_(True)
                lp = torch.log_softmax(clf(xi, tm), -1)[torch.arange(len(y)), y]
                grad = torch.autograd.grad(lp.sum(), xi)[0] * 1.0
        if kind == "ddpm":
            if guided:
                mean = mean.float() + var * grad.float()
            x = mean + mask * torch.exp(0.5 * log_var) * z
        else:
            ab, abp = e(ac, t), e(ac_prev, t)
            if guided:
                eps = (e(recip, t) * x - x0) / e(recipm1, t) - (1 - ab).sqrt() * grad
                x0 = e(recip, t) * x - e(recipm1, t) * eps
            eps = (e(recip, t) * x - x0) / e(recipm1, t)
            sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
            x = x0 * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma**2) * eps + mask * sigma * z
        seq.append(x)
    return seq


@pytest.mark.parametrize("kind, learn_sigma, sigma_small, guided, eta, respacing", [
    ("ddpm", True, False, False, None, "10"),
    ("ddpm", True, False, True, None, "10,5"),
    ("ddpm", False, False, True, None, "10"),
    ("ddpm", False, True, True, None, "12"),
    ("ddim", True, False, True, 0.0, "ddim10"),
    ("ddim", False, False, False, 0.7, "ddim8"),
])
def test_bit_identical_to_reference_formulas(kind, learn_sigma, sigma_small, guided, eta, respacing):
    p = DiffusionProcess.from_flags(noise_schedule="cosine", learn_sigma=learn_sigma, sigma_small=sigma_small,
                                    timestep_respacing=respacing)
    net, clf, y = TinyNet(6 if learn_sigma else 3), TinyClassifier(), torch.tensor([1, 7])
    g = torch.Generator().manual_seed(3)
    x_init, noises = torch.randn(SHAPE, generator=g), torch.randn(p.num_steps, *SHAPE, generator=g)
    with torch.no_grad():
        ref = reference_loop(p.betas, p.timestep_map, net, clf, kind, learn_sigma, sigma_small, guided, eta or 0.0,
                             x_init.clone(), noises, y)
    mine, noise = [], ReplayNoise(x_init, noises)
    run = SamplingRun(ADMDenoiser(net, p), guidance=[ClassifierGuidance()] if guided else None, noise=noise,
                      noisy_classifier=NoisyClassifier(clf, p), callback=lambda d: mine.append(d["x"]))
    sample(kind, run, noise.initial(SHAPE), p, y, **({"eta": eta} if kind == "ddim" else {}))
    assert len(mine) == len(ref) == p.num_steps
    for k, (a, b) in enumerate(zip(mine, ref)):
        assert torch.equal(a, b), f"step {k}: max abs diff {(a - b).abs().max().item()}"
