"""Sampler API: per-sample seeds are batch-size invariant end to end, errors are clear, callbacks observe."""

import pytest
import torch

from tailgen.diffusion import ADMDenoiser, DiffusionProcess, NoisyClassifier, Prediction, ReplayNoise, SeededNoise
from tailgen.sampling import SAMPLERS, sample
from tailgen.utils import ConfigError, SamplingError
from test_sampling_reference import ClassifierGuidance, TinyClassifier, TinyNet

SHAPE = (3, 8, 8)


def _run(name, seeds, labels, **kwargs):
    p = DiffusionProcess.from_flags(noise_schedule="cosine", learn_sigma=True, timestep_respacing="8")
    noise = SeededNoise(seeds)
    x = noise.initial((len(seeds), *SHAPE))
    return sample(name, ADMDenoiser(TinyNet(6), p), x, p, torch.tensor(labels), noise=noise,
                  guidance=[ClassifierGuidance(scale=2.0)], classifier=NoisyClassifier(TinyClassifier(), p), **kwargs)


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
    sample("ddim", denoiser, x, p, None, noise=SeededNoise([0, 1]), callback=seen.append, progress=True,
           model_kwargs={"low_res": "LR"})
    assert [d["step"] for d in seen] == [0, 1, 2, 3, 4] and [d["t"] for d in seen] == [800, 600, 400, 200, 0]
    assert [d["i"] for d in seen] == [4, 3, 2, 1, 0] and set(seen[0]) >= {"x", "x0", "step", "t"}
    assert calls == ["LR"] * 5
    assert "ddim" in capsys.readouterr().err  # the tqdm bar


def test_nan_names_step_and_t():
    p = DiffusionProcess.from_flags(timestep_respacing="10")
    nan = lambda x, i, labels=None: Prediction(eps=torch.full_like(x, float("nan")))
    for name in SAMPLERS:
        with pytest.raises(SamplingError, match=r"non-finite.* at step 0 of 10 \(t=999\).*network's output"):
            sample(name, nan, torch.randn(1, *SHAPE), p, noise=SeededNoise([0]), clip_denoised=False)


def test_bad_requests():
    p = DiffusionProcess.from_flags(timestep_respacing="10")
    zero = lambda x, i, labels=None: Prediction(eps=torch.zeros_like(x))
    x = torch.randn(1, *SHAPE)
    with pytest.raises(ConfigError, match="unknown sampler 'euler'"):
        sample("euler", zero, x, p)
    with pytest.raises(ConfigError, match="eta"):
        sample("ddim", zero, x, p, eta=1.5)
    with pytest.raises(ConfigError, match="only applies to the ddim"):
        sample("ddpm", zero, x, p, eta=0.5)
    with pytest.raises(ConfigError, match="needs a noisy classifier"):
        sample("ddpm", zero, x, p, torch.tensor([0]), guidance=ClassifierGuidance())
    with pytest.raises(ConfigError, match="form='mean' needs an ancestral sampler"):
        sample("dpmpp_2m", zero, x, p, torch.tensor([0]), guidance=ClassifierGuidance(form="mean"), classifier=zero)
    with pytest.raises(SamplingError, match="exhausted"):  # 10 steps, 9 recorded draws
        sample("ddpm", zero, x, p, noise=ReplayNoise(x, torch.randn(9, 1, *SHAPE)))
