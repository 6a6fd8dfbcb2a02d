"""Sampler API: per-sample seeds are batch-size invariant end to end, errors are clear, callbacks observe, the
guidance stack is validated once, and a new sampler is a few lines on ``SamplingRun``."""

import math

import pytest
import torch
from guidance_stubs import CountingGuidance

from tailgen.diffusion import ADMDenoiser, DiffusionProcess, NoisyClassifier, Prediction, ReplayNoise, SeededNoise
from tailgen.guidance import GuidanceStack
from tailgen.sampling import SAMPLERS, SamplingRun, sample, sample_ddim
from tailgen.utils import ConfigError, SamplingError
from test_sampling_reference import ClassifierGuidance, TinyClassifier, TinyNet

SHAPE = (3, 8, 8)


def _run(name, seeds, labels, **kwargs):
    p = DiffusionProcess.from_flags(noise_schedule="cosine", learn_sigma=True, timestep_respacing="8")
    noise = SeededNoise(seeds)
    x = noise.initial((len(seeds), *SHAPE))
    run = SamplingRun(ADMDenoiser(TinyNet(6), p), guidance=[ClassifierGuidance(scale=2.0)], noise=noise,
                      noisy_classifier=NoisyClassifier(TinyClassifier(), p))
    return sample(name, run, x, p, torch.tensor(labels), **kwargs)


@pytest.mark.parametrize("name, kwargs", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpmpp_2m", {})])
def test_per_sample_seeds_are_batch_size_invariant(name, kwargs):
    alone = _run(name, [11], [4], **kwargs)
    batch = _run(name, [3, 11, 5, 9], [1, 4, 2, 0], **kwargs)
    # the noise is bit-identical (test_diffusion_noise); batched BLAS may differ from batch-1 in the last ulps
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


def test_callback_progress_and_model_kwargs(capsys):
    p = DiffusionProcess.from_flags(timestep_respacing="ddim5")
    seen, calls = [], []

    def denoiser(x, i, labels=None, low_res=None):
        calls.append(low_res)
        return Prediction(eps=torch.zeros_like(x))

    x = torch.randn(2, *SHAPE)
    run = SamplingRun(denoiser, noise=SeededNoise([0, 1]), model_kwargs={"low_res": "LR"}, callback=seen.append,
                      progress=True)
    sample("ddim", run, x, p, None)
    assert [d["step"] for d in seen] == [0, 1, 2, 3, 4] and [d["t"] for d in seen] == [800, 600, 400, 200, 0]
    assert [d["i"] for d in seen] == [4, 3, 2, 1, 0] and set(seen[0]) >= {"x", "x0", "step", "t"}
    assert calls == ["LR"] * 5
    assert "ddim" in capsys.readouterr().err  # the tqdm bar


def test_nan_names_step_and_t():
    p = DiffusionProcess.from_flags(timestep_respacing="10")
    nan = lambda x, i, labels=None: Prediction(eps=torch.full_like(x, float("nan")))
    for name in SAMPLERS:
        with pytest.raises(SamplingError, match=r"non-finite.* at step 0 of 10 \(t=999\).*network's output"):
            sample(name, SamplingRun(nan, noise=SeededNoise([0]), clip_denoised=False), torch.randn(1, *SHAPE), p)


def test_bad_requests():
    p = DiffusionProcess.from_flags(timestep_respacing="10")
    zero = lambda x, i, labels=None: Prediction(eps=torch.zeros_like(x))
    x = torch.randn(1, *SHAPE)
    with pytest.raises(ConfigError, match="unknown sampler 'euler'"):
        sample("euler", SamplingRun(zero), x, p)
    with pytest.raises(ConfigError, match="eta"):
        sample("ddim", SamplingRun(zero), x, p, eta=1.5)
    with pytest.raises(ConfigError, match="only applies to the ddim"):
        sample("ddpm", SamplingRun(zero), x, p, eta=0.5)
    with pytest.raises(ConfigError, match="needs a noisy classifier"):
        sample("ddpm", SamplingRun(zero, guidance=ClassifierGuidance()), x, p, torch.tensor([0]))
    with pytest.raises(ConfigError, match="form='mean' needs an ancestral sampler"):
        sample("dpmpp_2m", SamplingRun(zero, guidance=ClassifierGuidance(form="mean"), noisy_classifier=zero), x, p,
               torch.tensor([0]))
    with pytest.raises(SamplingError, match="exhausted"):  # 10 steps, 9 recorded draws
        sample("ddpm", SamplingRun(zero, noise=ReplayNoise(x, torch.randn(9, 1, *SHAPE))), x, p)


def test_a_stack_is_validated_once_per_setup_and_an_unvalidated_one_still_fails():
    p = DiffusionProcess.from_flags(timestep_respacing="3")
    zero = lambda x, i, labels=None: Prediction(eps=torch.zeros_like(x))
    clf = NoisyClassifier(TinyClassifier(), p)
    g = CountingGuidance()
    stack = GuidanceStack([g])
    for _ in range(2):  # two batches with the same stack: one check
        sample("ddim", SamplingRun(zero, guidance=stack, noisy_classifier=clf), torch.randn(1, *SHAPE), p,
               torch.tensor([0]))
    assert g.validations == 1
    sample("ddpm", SamplingRun(zero, guidance=stack, noisy_classifier=clf), torch.randn(1, *SHAPE), p,
           torch.tensor([0]))
    assert g.validations == 2  # another sampler is another setup
    for _ in range(2):  # a failed check is not remembered: it fails every time, before the first step
        with pytest.raises(ConfigError, match="needs a noisy classifier"):
            sample("ddim", SamplingRun(zero, guidance=stack), torch.randn(1, *SHAPE), p, torch.tensor([0]))
    assert g.validations == 4


@torch.no_grad()
def sample_euler(run: SamplingRun, x, process, labels=None):
    """A new sampler on ``SamplingRun``: Euler steps of the probability-flow ODE in the VE view of the VP process,
    x_bar = x / sqrt(abar), sigma = sqrt((1 - abar) / abar), d x_bar / d sigma = (x_bar - x0_hat) / sigma (Karras et
    al. 2022, Alg. 1 without the correction; k-diffusion's ``sample_euler``). Mathematically DDIM with eta = 0."""
    for ctx in run.steps("euler", x, process, labels):
        i = ctx.i
        # Guided prediction: H3, network, H1, clipped x0_hat, score-form gradients, H4
        pred = run.predict(ctx)
        # VE noise levels of x_t and x_{i-1} (sigma = 0 past the end)
        abar, abar_prev = float(process.alphas_cumprod[i]), float(process.alphas_cumprod_prev[i])
        sigma, sigma_next = math.sqrt((1 - abar) / abar), math.sqrt((1 - abar_prev) / abar_prev)
        # Euler step in x_bar with slope (x_bar - x0_hat) / sigma, back to the VP scale
        x_bar = pred.x / math.sqrt(abar)
        x_bar = x_bar + (sigma_next - sigma) * (x_bar - pred.x0) / sigma
        # H5, non-finite check, callback
        x = run.finish(ctx, x_bar * math.sqrt(abar_prev), pred.x0)
    return x


@pytest.mark.parametrize("guided", [False, True])
def test_a_new_sampler_in_a_few_lines_matches_ddim(guided):
    # linear schedule: sigma_max = sqrt((1 - abar) / abar) ~ 160 (cosine's ~2e4 costs x_bar all its float32 digits)
    p = DiffusionProcess.from_flags(learn_sigma=True, timestep_respacing="8")
    labels = torch.tensor([1, 4, 2])

    def run(sampler, scale):
        noise = SeededNoise([3, 11, 5])
        sampling = SamplingRun(ADMDenoiser(TinyNet(6), p), guidance=[ClassifierGuidance(scale=scale)], noise=noise,
                               noisy_classifier=NoisyClassifier(TinyClassifier(), p))
        return sampler(sampling, noise.initial((3, *SHAPE)), p, labels)

    scale = 4.0 if guided else 0.0
    euler, ddim = run(sample_euler, scale), run(sample_ddim, scale)
    torch.testing.assert_close(euler, ddim, atol=2e-4, rtol=0)  # float32 rounding of x_bar (measured <= 5e-5)
    if guided:  # the guidance reached the new sampler (score form: "euler" is not ancestral)
        assert (euler - run(sample_euler, 0.0)).abs().max() > 1e-2
