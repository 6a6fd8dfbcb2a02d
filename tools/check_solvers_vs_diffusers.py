"""Cross-check tailgen's DPM-Solver++(2M) and SDE-DPM-Solver++(2M) against an independent implementation: the
``DPMSolverMultistepScheduler`` of Hugging Face diffusers (not a tailgen dependency; install it beside the project):

    pip install --target /tmp/diffusers diffusers huggingface_hub regex safetensors
    PYTHONPATH=/tmp/diffusers python tools/check_solvers_vs_diffusers.py

Both run on the same problem with an exact denoiser (data x0 ~ N(mu, s^2 I), tests/test_sampling_solver.py), ADM's
cosine schedule (diffusers' ``squaredcos_cap_v2``), the same kept timesteps (ADM's ``"K"`` respacing) and, for the
SDE form, the same noise per step (diffusers' ``variance_noise``). diffusers steps into the last kept timestep at
second order and then to sigma = 0 at first order, which is tailgen's ``lower_order_final=False`` (then x0_hat at
t = 0). Prints the largest difference of the final samples; diffusers computes its coefficients in float32, so
agreement is expected to about 1e-4, not to float64 precision.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tailgen.diffusion import DiffusionProcess  # noqa: E402
from tailgen.sampling import SamplingRun, sample_dpmpp_2m, sample_dpmpp_2m_sde  # noqa: E402
from test_sampling_sde import FixedNoise  # noqa: E402
from test_sampling_solver import gaussian_denoiser, x0_hat  # noqa: E402


def compare(K: int, algorithm: str) -> float:
    from diffusers import DPMSolverMultistepScheduler

    sampler = sample_dpmpp_2m_sde if algorithm == "sde-dpmsolver++" else sample_dpmpp_2m
    process = DiffusionProcess.from_flags(noise_schedule="cosine", timestep_respacing=str(K))
    x_T = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    noise = FixedNoise(x_T.shape, K, seed=6)
    ours = sampler(SamplingRun(gaussian_denoiser(process), clip_denoised=False, noise=noise), x_T.clone(), process,
                   lower_order_final=False)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                            algorithm_type=algorithm, solver_order=2, solver_type="midpoint",
                                            lower_order_final=True, final_sigmas_type="zero", prediction_type="epsilon")
    scheduler.set_timesteps(timesteps=[int(t) for t in process.timestep_map[::-1]])
    x = x_T.clone()
    for k, t in enumerate(scheduler.timesteps):
        abar = float(scheduler.alphas_cumprod[int(t)])
        eps = (x - math.sqrt(abar) * x0_hat(x, abar)) / math.sqrt(1 - abar)
        x = scheduler.step(eps, t, x, variance_noise=noise.draws[k] if "sde" in algorithm else None).prev_sample
    return (ours - x).abs().max().item()


def main() -> None:
    worst = 0.0
    for K in (10, 25, 50):
        for algorithm in ("dpmsolver++", "sde-dpmsolver++"):
            diff = compare(K, algorithm)
            worst = max(worst, diff)
            print(f"{K:3d} steps  diffusers {algorithm:16s} max |tailgen - diffusers| = {diff:.2e}")
    if worst > 1e-3:
        raise SystemExit(f"check_solvers_vs_diffusers: disagreement {worst:.2e} > 1e-3")


if __name__ == "__main__":
    main()
