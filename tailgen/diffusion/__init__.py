"""Layer 2: schedules, timestep respacing, the diffusion process, network adapters and noise sources."""

from tailgen.diffusion.adapters import ADMDenoiser, NoisyClassifier, Prediction
from tailgen.diffusion.noise import NoiseSource, ReplayNoise, SeededNoise, TorchNoise
from tailgen.diffusion.process import DiffusionProcess
from tailgen.diffusion.schedules import betas_for_alpha_bar, get_named_beta_schedule, space_timesteps

__all__ = [
    "ADMDenoiser",
    "DiffusionProcess",
    "NoiseSource",
    "NoisyClassifier",
    "Prediction",
    "ReplayNoise",
    "SeededNoise",
    "TorchNoise",
    "betas_for_alpha_bar",
    "get_named_beta_schedule",
    "space_timesteps",
]
