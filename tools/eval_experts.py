"""Accuracy of PPAP classifier experts on their own noise ranges vs the supervised noisy classifier (issue 12).

    python tools/eval_experts.py [--prefix fashion_ppap_expert] [--json out.json]

For each expert k (presets ``<prefix>0..``, range from its JSON ``meta.expert.t_range``), the 10,000 Fashion-MNIST
test images are noised to x_t = q_sample(x0, t, eps) with t ~ U{lo_k..hi_k} (one fixed draw of t and eps, seed 0,
the same for every classifier), and the accuracy of argmax p(y | x_t) is reported for the expert (called at
t = 0, its ``fixed_t``), the shipped noisy classifier (called at t) and the clean classifier it was distilled from
(called at t = 0, no adaptation).
"""

from __future__ import annotations

import argparse
import json

import torch

from tailgen.data.fashion_mnist import FashionMNIST
from tailgen.diffusion.process import DiffusionProcess
from tailgen.models.presets import PRESETS
from tailgen.models.spec import NetworkSpec


@torch.no_grad()
def accuracy(net, x, t, y, batch: int = 500) -> float:
    return sum((net(x[s:s + batch], t[s:s + batch]).argmax(1) == y[s:s + batch]).sum().item()
               for s in range(0, len(x), batch)) / len(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default="fashion_ppap_expert")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="the first N test images only (a quick look)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = sorted((n for n in PRESETS if n.startswith(args.prefix)), key=lambda n: int(n[len(args.prefix):]))
    if not names:
        raise SystemExit(f"eval_experts: no preset named {args.prefix}<k>: export the experts into tailgen/weights first")
    ds = FashionMNIST("test", image_size=28)
    x, y = ds.images[:args.limit], ds.labels[:args.limit]
    process = DiffusionProcess.from_flags(diffusion_steps=1000, noise_schedule="cosine", learn_sigma=True)
    noisy = NetworkSpec(preset="fashion_noisy_classifier").build().eval()
    clean = NetworkSpec(preset="fashion_clean_classifier").build().eval()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    results = {}
    for name in names:
        lo, hi = PRESETS[name]["info"]["meta"]["expert"]["t_range"]
        t = torch.randint(lo, hi + 1, (len(x),), generator=g)
        xt, zero = process.q_sample(x, t, noise), torch.zeros_like(t)
        row = {"expert": accuracy(NetworkSpec(preset=name).build().eval(), xt, zero, y),
               "noisy_classifier": accuracy(noisy, xt, t, y), "clean_classifier": accuracy(clean, xt, zero, y)}
        results[f"{lo}-{hi}"] = row
        print(f"t in [{lo}, {hi}]: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
