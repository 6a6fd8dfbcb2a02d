"""Schedules and timestep respacing match guided-diffusion (fixtures README 5.1, 5.2)."""

import math

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from tailgen.diffusion import DiffusionProcess, get_named_beta_schedule, space_timesteps
from tailgen.utils import ConfigError


def test_cosine_and_linear_betas():
    cos = get_named_beta_schedule("cosine", 1000)
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    assert cos.dtype == np.float64 and cos.shape == (1000,)
    assert cos[0] == min(1 - abar(1 / 1000) / abar(0), 0.999) and cos[-1] == 0.999
    lin = get_named_beta_schedule("linear", 1000)
    assert lin[0] == 1e-4 and lin[-1] == 0.02
    assert get_named_beta_schedule("linear", 4000)[0] == pytest.approx(2.5e-5)  # scaled to the step count


def test_plain_count_rounds_half_to_even():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "25") == [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583,
                                           624, 666, 708, 749, 791, 832, 874, 916, 957, 999]  # 166, 832: half to even
    assert space_timesteps(1000, 250) == space_timesteps(1000, "250")
    assert len(space_timesteps(1000, "250")) == 250
    assert space_timesteps(1000, "") == list(range(1000)) == space_timesteps(1000, "1000")


def test_ddim_stride_and_sections():
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))  # 999 not included
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    kept = space_timesteps(1000, "10,10,10")  # sections of 334, 333, 333 steps
    assert len(kept) == 30 and kept == sorted(kept)
    assert [kept[0], kept[9], kept[10], kept[19], kept[20], kept[29]] == [0, 333, 334, 666, 667, 999]
    assert space_timesteps(1000, "5,1") == [0, 125, 250, 374, 499, 500]  # count 1: the section's first step


def test_respaced_process_matches_reference():
    golden = torch.load(FIXTURES / "golden_sampling.pt")
    for run in golden["runs"].values():
        p = DiffusionProcess.from_flags(noise_schedule="cosine", learn_sigma=True,
                                        timestep_respacing=run["timestep_respacing"])
        assert p.timestep_map.tolist() == run["timestep_map"].tolist()
        assert np.array_equal(p.betas, run["betas"].numpy())
        assert np.array_equal(p.alphas_cumprod, run["alphas_cumprod"].numpy())


@pytest.mark.parametrize("spec", ["ten", "10,,10", "ddimx", "1.5", "0", "10,-1", "ddim"])
def test_malformed_respacing(spec):
    with pytest.raises(ConfigError, match="timestep_respacing"):
        space_timesteps(1000, spec)


def test_bad_configs_are_clear():
    with pytest.raises(ConfigError, match="asks for 250 steps.*diffusion_steps=100"):
        DiffusionProcess.from_flags(diffusion_steps=100, timestep_respacing="250")
    with pytest.raises(ConfigError, match="no integer stride gives exactly 999"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ConfigError, match="unknown noise_schedule 'sqrt'"):
        get_named_beta_schedule("sqrt", 1000)
    with pytest.raises(ConfigError, match="positive integer"):
        get_named_beta_schedule("linear", 0)
