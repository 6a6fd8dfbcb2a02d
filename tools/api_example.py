"""Notebook-style walk-through of tailgen's Python API (no CLI, no Trainer): sample the shipped Fashion-MNIST
model unguided and with tail guidance, evaluate both, and write one class-per-row grid each.

    python tools/api_example.py [--per-class 20] [--steps 50] [--max-reference 2000] [--out outputs/api_example]

Each ``# %%`` cell runs on its own in Jupyter / VS Code. Numbers: domain features of the shipped clean
classifier against the first ``--max-reference`` Fashion-MNIST test images.
"""

# %% Setup
import argparse
import json
from pathlib import Path

import torch

from tailgen import (ClassifierGuidance, Evaluation, GuidedDiffusion, LowDensityGuidance, NetworkSpec, make_grid,
                     save_png)

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--per-class", type=int, default=20, help="samples per class (10 classes)")
ap.add_argument("--steps", type=int, default=50, help="DDPM steps (respacing of the 1000-step model)")
ap.add_argument("--max-reference", type=int, default=2000, help="real test images in the reference")
ap.add_argument("--out", default="outputs/api_example")
ap.add_argument("--no-sample-check", action="store_true",
                help="skip the degenerate-sample check (a smoke test with very few steps saturates images)")
ap.add_argument("--cache-dir", default="~/.cache/tailgen/features", help="where reference features are cached")
args = ap.parse_args()
torch.set_num_threads(max(1, torch.get_num_threads()))
out = Path(args.out)

# %% The two samplers: same networks, same step count, different guidance
common = dict(network=NetworkSpec("fashion_diffusion"), classifier=NetworkSpec("fashion_noisy_classifier"),
              diffusion={"timestep_respacing": str(args.steps)}, check_samples=not args.no_sample_check)
models = {
    "unguided": GuidedDiffusion(**common),
    "tail": GuidedDiffusion(**common, guidances={"cg": ClassifierGuidance(scale=1.0),
                                                 "tail": LowDensityGuidance("target", target_confidence=0.5,
                                                                            scale=2.0, form="mean")}),
}

# %% Sample: class-major labels, seeds derived from seed=0 (the same images `tailgen predict` gives)
labels = [c for c in range(10) for _ in range(args.per_class)]
images = {name: model.generate(labels, seed=0, batch_size=100) for name, model in models.items()}

# %% Evaluate both sets against the same real reference (features cached on disk after the first run)
evaluation = Evaluation(metrics=["fid", "precision", "recall", "coverage", "tail"],
                        feature_network=NetworkSpec("fashion_clean_classifier"), max_reference=args.max_reference,
                        cache_dir=args.cache_dir)
results = {name: evaluation.evaluate(imgs, labels, num_classes=10) for name, imgs in images.items()}
keys = ["fid", "precision", "recall", "coverage", "tail/accuracy"]
print(f"{'':<10}" + "".join(f"{k:>15}" for k in keys))
for name, values in results.items():
    print(f"{name:<10}" + "".join(f"{values[k]:>15.4f}" for k in keys))

# %% Pictures: one row per class (at most 16 samples per row)
out.mkdir(parents=True, exist_ok=True)
per_row = min(args.per_class, 16)
for name, imgs in images.items():
    keep = torch.tensor([k for k in range(len(labels)) if k % args.per_class < per_row])
    save_png(make_grid(imgs[keep].numpy(), nrow=per_row), out / f"grid_{name}.png")
(out / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
print(f"wrote {out}/grid_unguided.png, {out}/grid_tail.png and {out}/metrics.json")
