"""Sample-sanity statistics of normal and pathological Fashion-MNIST runs (issue 10): where to put the
saturation threshold of `tailgen.sampling.sanity`.

    OMP_NUM_THREADS=1 python tools/measure_saturation.py --num-samples 40 --steps 50

For every run it prints, over the final float samples x (before the uint8 conversion; the check itself is off):
  low / high   share of pixels at uint8 0 / 255,
  beyond       share of pixels with |x| > 1.1,
  sat          the sanity statistic of the batch, max(min(low, high), beyond) (``sanity.saturation_share``),
  sat/sample   the largest per-sample value of the same statistic,
  max|x_t|     the largest per-sample RMS of x_t over the steps,
and whether the check trips (sat > SATURATION_LIMIT).
"""

from __future__ import annotations

import argparse
import time

import torch

from tailgen.guidance import ClassifierGuidance, LowDensityGuidance
from tailgen.models.spec import NetworkSpec
from tailgen.module.guided import GuidedDiffusion
from tailgen.module.sampling_data import sample_seed
from tailgen.sampling.sanity import SATURATION_LIMIT, saturation_share


def runs():
    def cg(s):
        return {"cg": ClassifierGuidance(scale=s)}

    default = lambda s=1.0: {"cg": ClassifierGuidance(scale=s),  # noqa: E731
                             "tail": LowDensityGuidance(variant="target", scale=2.0, target_confidence=0.5, form="mean")}
    yield "plain", {}, True, "ddpm"
    yield "plain clip=false", {}, False, "ddpm"
    for s in (1.0, 2.0, 4.0, 10.0):
        yield f"adm_g s={s:g}", cg(s), True, "ddpm"
    yield "adm_g s=4 clip=false", cg(4.0), False, "ddpm"
    yield "adm_g s=10 clip=false", cg(10.0), False, "ddpm"
    yield "adm_g s=4 ddim", cg(4.0), True, "ddim"
    yield "default", default(), True, "ddpm"
    yield "default s_cg=10", default(10.0), True, "ddpm"
    yield "adm_g s=100", cg(100.0), True, "ddpm"
    yield "adm_g s=1e3", cg(1e3), True, "ddpm"
    yield "adm_g s=1e6", cg(1e6), True, "ddpm"
    yield "adm_g s=1e6 clip=false", cg(1e6), False, "ddpm"
    yield "adm_g s=1e6 ddim", cg(1e6), True, "ddim"
    yield "default s_cg=1e6", default(1e6), True, "ddpm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=40)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", nargs="*", help="run names to keep (default: all)")
    args = parser.parse_args()
    labels = torch.arange(args.num_samples) % 10
    seeds = torch.tensor([sample_seed(0, k) for k in range(args.num_samples)])
    print(f"{'run':24s} {'low':>6s} {'high':>6s} {'beyond':>6s} {'sat':>6s} {'sat/sample':>10s} {'max|x_t|':>9s}  "
          f"trips (> {SATURATION_LIMIT})")
    for name, guidances, clip, sampler in runs():
        if args.only and name not in args.only:
            continue
        module = GuidedDiffusion(
            network=NetworkSpec(preset="fashion_diffusion"), classifier=NetworkSpec(preset="fashion_noisy_classifier"),
            diffusion={"timestep_respacing": str(args.steps)}, sampler=sampler, clip_denoised=clip,
            guidances=guidances, progress=False, check_samples=False)
        rms = []
        start = time.time()
        x = module.sample(labels, seeds, callback=lambda info: rms.append(
            info["x"].flatten(1).pow(2).mean(1).sqrt().max().item()))
        x = torch.nan_to_num(x, nan=0.0, posinf=1e30, neginf=-1e30)
        low, high = (x < -1 + 1 / 127.5).float().mean().item(), (x >= 1).float().mean().item()
        beyond = (x.abs() > 1.1).float().mean().item()
        sat = saturation_share(x).item()
        per_sample = max(saturation_share(x[k:k + 1]).item() for k in range(len(x)))
        print(f"{name:24s} {low:6.3f} {high:6.3f} {beyond:6.3f} {sat:6.3f} {per_sample:10.3f} {max(rms):9.3g}  "
              f"{str(sat > SATURATION_LIMIT):5s}  {time.time() - start:.0f}s", flush=True)

if __name__ == "__main__":
    main()
