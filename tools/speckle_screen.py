"""Where do the ODE samplers' speckled samples come from? A quick screen on the shipped Fashion model (issue 11).

    python tools/speckle_screen.py [--n 160] [--out docs/steps_study/speckles]   # ~10 min on one core

A sample counts as *speckled* when its mean absolute Laplacian (high-frequency energy, images in [-1, 1]) exceeds
the 99th percentile of 2,000 real Fashion-MNIST test images: by construction 1 % of real images count. Every row
samples the same ``n`` balanced labels and seeds (``tailgen predict`` seeds, data seed 0), unguided, float32.

Rows (each: sampler, step count, timestep grid):

* the step count at a fixed grid (uniform in t, ADM's ``"K"`` respacing): is it discretisation error?
* grids that skip ADM's degenerate first step (t = T - 1: abar = 2.4e-9, sigma = sqrt((1 - abar) / abar) = 2e4 on
  the cosine schedule): uniform in t up to sigma <= 80 (t = 990; EDM's sigma_max for ADM's ImageNet-64 model),
  Karras et al.'s rho = 7 grid and a grid uniform in log-SNR, both from sigma = 80 down to the model's last sigma,
  mapped to the nearest discrete timesteps;
* stochastic samplers at the same cost per step (DDPM, DDIM at eta = 1, SDE-DPM-Solver++(2M)).

Writes ``<out>.json`` (every row) and ``<out>.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from tailgen.data.fashion_mnist import load_fashion_mnist
from tailgen.diffusion.schedules import get_named_beta_schedule, space_timesteps
from tailgen.models.spec import NetworkSpec
from tailgen.module.guided import GuidedDiffusion

ROOT = Path(__file__).resolve().parents[1]
SIGMA_MAX = 80.0  # EDM (Karras et al. 2022) for ADM's ImageNet-64 model
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def sigmas(num_steps: int = 1000) -> np.ndarray:
    """sigma(t) = sqrt((1 - abar_t) / abar_t) of ADM's cosine schedule, t = 0 .. N-1."""
    abar = np.cumprod(1.0 - get_named_beta_schedule("cosine", num_steps))
    return np.sqrt((1.0 - abar) / abar)


def nearest_timesteps(targets: np.ndarray, sigma: np.ndarray) -> list[int]:
    """The discrete timesteps whose sigma is nearest (in log) to each target, deduplicated, ascending."""
    return sorted({int(np.argmin(np.abs(np.log(sigma) - math.log(s)))) for s in targets})


def grid(name: str, K: int, sigma: np.ndarray) -> list[int]:
    """Kept timesteps of a named grid with K steps (see the module docstring)."""
    if name == "uniform":  # ADM's "K" respacing
        return space_timesteps(len(sigma), str(K))
    t_cap = int(np.nonzero(sigma <= SIGMA_MAX)[0].max())
    if name == "uniform_sigma80":
        return sorted({int(round(t)) for t in np.linspace(0, t_cap, K)})
    if name == "karras_sigma80":
        r = np.linspace(0.0, 1.0, K)
        rho = 7.0
        return nearest_timesteps((SIGMA_MAX ** (1 / rho) + r * (sigma[0] ** (1 / rho) - SIGMA_MAX ** (1 / rho))) ** rho,
                                 sigma)
    if name == "logsnr_sigma80":
        return nearest_timesteps(np.exp(np.linspace(math.log(SIGMA_MAX), math.log(sigma[0]), K)), sigma)
    raise ValueError(f"unknown grid {name!r}")


def high_frequency(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute Laplacian per image (N x 1 x H x W, [-1, 1])."""
    return F.conv2d(images, LAPLACIAN).abs().mean(dim=(1, 2, 3))


def sample(sampler: str, kept: list[int], n: int, eta: float = 0.0) -> tuple[torch.Tensor, float]:
    """n balanced-label samples of the shipped model over exactly the ``kept`` timesteps; images in [-1, 1]."""
    with mock.patch("tailgen.diffusion.process.space_timesteps", lambda num_steps, spec: kept):
        model = GuidedDiffusion(NetworkSpec("fashion_diffusion"), diffusion={"timestep_respacing": str(len(kept))},
                                sampler=sampler, eta=eta, progress=False, check_samples=False, autocast=None)
    start = time.perf_counter()
    images = model.generate(torch.arange(n) % 10, seed=0, batch_size=160)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1, time.perf_counter() - start


ROWS = [  # (sampler, steps, grid, eta)
    ("ddim", 10, "uniform", 0.0), ("ddim", 50, "uniform", 0.0), ("ddim", 100, "uniform", 0.0),
    ("ddim", 10, "uniform_sigma80", 0.0), ("ddim", 10, "karras_sigma80", 0.0), ("ddim", 10, "logsnr_sigma80", 0.0),
    ("dpmpp_2m", 10, "uniform", 0.0), ("dpmpp_2m", 25, "uniform", 0.0),
    ("ddpm", 10, "uniform", 0.0), ("ddpm", 50, "uniform", 0.0), ("ddim", 10, "uniform", 1.0),
    ("ddim", 25, "uniform", 1.0), ("dpmpp_2m_sde", 10, "uniform", 0.0), ("dpmpp_2m_sde", 25, "uniform", 0.0),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=160, help="samples per row (balanced labels)")
    ap.add_argument("--out", default=str(ROOT / "docs/steps_study/speckles"))
    args = ap.parse_args(argv)
    real, _ = load_fashion_mnist("test")
    real_hf = high_frequency(torch.from_numpy(real[:2000, None]).float() / 127.5 - 1)
    threshold = float(torch.quantile(real_hf, 0.99))
    sigma, rows = sigmas(), []
    for sampler, K, grid_name, eta in ROWS:
        kept = grid(grid_name, K, sigma)
        images, seconds = sample(sampler, kept, args.n, eta)
        hf = high_frequency(images)
        rows.append(dict(sampler=sampler, eta=eta, steps=len(kept), grid=grid_name, first_t=kept[-1],
                         first_sigma=float(sigma[kept[-1]]), speckled=float((hf > threshold).float().mean()),
                         high_frequency=float(hf.mean()), seconds=round(seconds, 1)))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(n=args.n, threshold=threshold, real_high_frequency=float(real_hf.mean()), rows=rows)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(write_markdown(result, out))


def write_markdown(result: dict, out: Path) -> str:
    """``<out>.md``: the table of a screen's result (``<out>.json``)."""
    n, rows = result["n"], result["rows"]
    spread = 100 * math.sqrt(0.18 * 0.82 / n)
    lines = [f"# Speckled samples by sampler and timestep grid ({n} samples per row)", "",
             "`python tools/speckle_screen.py` (module docstring: the rule and the grids). Real test images: mean "
             f"high-frequency energy {result['real_high_frequency']:.3f}, 1 % above the threshold "
             f"{result['threshold']:.3f}. Binomial std of an 18 % share at {n} samples: {spread:.1f} points.", "",
             "| sampler | eta | steps | grid | first t (sigma) | speckled | high-frequency energy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eta = f"{r['eta']:g}" if r["sampler"] == "ddim" else "-"  # eta is DDIM's alone
        lines.append(f"| {r['sampler']} | {eta} | {r['steps']} | {r['grid']} | {r['first_t']} ({r['first_sigma']:.3g}) | "
                     f"{r['speckled']:.1%} | {r['high_frequency']:.3f} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
