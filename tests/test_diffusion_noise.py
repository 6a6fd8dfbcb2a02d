"""Noise sources: per-sample seeds are batch-size invariant; recorded noise replays exactly."""

import pytest
import torch

from tailgen.diffusion import NoiseSource, ReplayNoise, SeededNoise, TorchNoise
from tailgen.utils import ConfigError, SamplingError


def _draws(seeds, shape=(3, 4, 4), steps=3, extra_at=()):
    noise = SeededNoise(seeds)
    x = noise.initial((len(seeds), *shape))
    out = [x]
    for k in range(steps):
        if k in extra_at:
            noise.extra(x)
        out.append(noise.step(x))
    return out


def test_seeded_noise_is_batch_size_invariant():
    alone = _draws([7])
    in_batch = _draws([1, 7, 2**40, 3])
    for a, b in zip(alone, in_batch):
        assert torch.equal(a[0], b[1])
    assert torch.equal(alone[0][0], torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(7)))


def test_extra_stream_is_independent():
    plain, interleaved = _draws([5, 6]), _draws([5, 6], extra_at=(0, 1))
    assert all(torch.equal(a, b) for a, b in zip(plain, interleaved))  # extra never shifts the main stream
    noise = SeededNoise([5])
    x = noise.initial((1, 8))
    assert not torch.equal(noise.extra(x), SeededNoise([5]).step(x))
    assert isinstance(noise, NoiseSource) and isinstance(TorchNoise(), NoiseSource)


def test_seeded_noise_validation():
    with pytest.raises(ConfigError):
        SeededNoise([])
    with pytest.raises(ConfigError):
        SeededNoise([-1])
    with pytest.raises(SamplingError, match="one seed per sample"):
        SeededNoise([1, 2]).initial((3, 2))
    noise = SeededNoise(torch.tensor([1, 2]), dtype=torch.float64)
    assert noise.initial((2, 2)).dtype == torch.float64


def test_replay_noise_in_order_and_exhaustion():
    init, steps = torch.randn(2, 3), torch.randn(2, 2, 3)
    noise = ReplayNoise(init, steps)
    assert torch.equal(noise.initial((2, 3)), init)
    assert torch.equal(noise.step(init), steps[0]) and torch.equal(noise.step(init), steps[1])
    with pytest.raises(SamplingError, match="exhausted"):
        noise.step(init)
    with pytest.raises(SamplingError, match="extra"):
        noise.extra(init)
    with pytest.raises(SamplingError, match="shape"):
        ReplayNoise(init, steps).initial((4, 3))
