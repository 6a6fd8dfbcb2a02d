"""Sample quality of each speed option vs float32 on Fashion, same labels and seeds (issue 11).

    python tools/quality_vs_fp32.py --num-samples 2000 --steps 50 --out outputs/quality_vs_fp32
                                    [--settings fp32,fp32_seed1,default,bf16,bf16_cl,bf16_clf,sdpa,channels_last,compile,int8]
                                    [--batch-size 100] [--unguided] [--device cpu] [--calibration 256]

Samples the shipped fashion_diffusion with ADM-G s=1 (fashion_noisy_classifier; ``--unguided``: no guidance) for
class-balanced labels with the seeds of ``tailgen predict --data.seed 0``, once per setting, and measures each set
with ``Evaluation.evaluate`` (domain features of fashion_clean_classifier vs the Fashion-MNIST test split): FID,
precision, recall, class accuracy. ``fp32_seed1`` (float32, data seed 1) gives the seed noise: a speed option
whose differences to fp32 are within |fp32_seed1 - fp32| changes nothing measurable. Also reported: the mean abs
pixel difference to the fp32 images of the same seeds. ``int8`` (CPU only) is the calibrated int8 UNet
(``quantize: int8``, ``--calibration`` inputs; the classifier stays float32).

Resumable: samples go to ``<out>/<setting>/chunk_<k>.npz`` (atomic), metrics to ``<out>/<setting>/metrics.json``;
what exists is reused, so a killed run continues. Writes ``<out>/results.md`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tailgen.guidance import ClassifierGuidance
from tailgen.models.spec import NetworkSpec
from tailgen.models.speed import STRICT_FP32
from tailgen.module.evaluation import Evaluation
from tailgen.module.guided import GuidedDiffusion
from tailgen.module.sampling_data import sample_seed
from tailgen.utils.io import atomic_write

SETTINGS = {
    "fp32": {},  # every setting starts from STRICT_FP32 (tailgen.models.speed)
    "default": {k: v.default for k, v in inspect.signature(GuidedDiffusion).parameters.items() if k in STRICT_FP32},
    "fp32_seed1": {"seed": 1},
    "bf16": {"autocast": "bf16"},
    "bf16_cl": {"autocast": "bf16", "channels_last": True},
    "bf16_clf": {"autocast": "bf16", "autocast_classifier": True, "channels_last": True},
    "fp16": {"autocast": "fp16"},
    "sdpa": {"attention": "sdpa"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "int8": {"quantize": "int8"},
}
HEADLINE = ("fid", "precision", "recall", "tail/accuracy")


def build(options: dict, steps: int, guided: bool, device: str, calibration: int = 256) -> GuidedDiffusion:
    """The Fashion model with ``options`` on top of strict float32 (not GuidedDiffusion's defaults, which may be
    one of the settings under test)."""
    options = {**STRICT_FP32, **options}
    if options.get("quantize"):
        options = {**options, "calibration": calibration}
    return GuidedDiffusion(
        NetworkSpec(preset="fashion_diffusion"),
        NetworkSpec(preset="fashion_noisy_classifier") if guided else None,
        diffusion={"timestep_respacing": str(steps)}, progress=False,
        guidances={"classifier": ClassifierGuidance(scale=1.0)} if guided else None,
        **{k: v for k, v in options.items() if k != "seed"}).to(device)


def samples(name: str, options: dict, labels: np.ndarray, args) -> np.ndarray:
    """All images of one setting, generated chunk by chunk (existing chunks are reused)."""
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    module, chunks = None, []
    for k in tqdm(range(0, len(labels), args.batch_size), desc=name):
        path = folder / f"chunk_{k // args.batch_size:04d}.npz"
        if not path.exists():
            module = module or build(options, args.steps, not args.unguided, args.device, args.calibration)
            part = labels[k:k + args.batch_size]
            seeds = [sample_seed(options.get("seed", 0), j) for j in range(k, k + len(part))]
            images = module.generate(part.tolist(), seeds, batch_size=args.batch_size).numpy()
            atomic_write(path, lambda tmp, images=images: np.savez(tmp, images=images))
        chunks.append(np.load(path)["images"])
    return np.concatenate(chunks)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--settings", default="fp32,fp32_seed1,bf16,bf16_cl,bf16_clf,sdpa,channels_last")
    ap.add_argument("--unguided", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-reference", type=int, default=None, help="first N test images as the reference")
    ap.add_argument("--calibration", type=int, default=256, help="calibration inputs of the int8 setting")
    ap.add_argument("--out", type=Path, default=Path("outputs/quality_vs_fp32"))
    args = ap.parse_args(argv)
    names = ["fp32", *[n for n in args.settings.split(",") if n != "fp32"]]
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        ap.error(f"unknown setting {bad[0]!r}: use {', '.join(SETTINGS)}")
    labels = np.arange(args.num_samples) % 10  # class-balanced
    evaluation = Evaluation(metrics=["fid", "precision", "recall", "tail"], features="classifier",
                            feature_network=NetworkSpec(preset="fashion_clean_classifier"),
                            reference="fashion_mnist:test", max_reference=args.max_reference)
    results, base = {}, None
    for name in names:
        images = samples(name, SETTINGS[name], labels, args)
        base = images if name == "fp32" else base
        metrics_path = args.out / name / "metrics.json"
        if metrics_path.exists():
            values = json.loads(metrics_path.read_text())
        else:
            values = evaluation.evaluate(images, labels, num_classes=10)
            values["pixel_mean_abs_diff_vs_fp32"] = float(np.abs(images.astype(np.float32) - base).mean() / 127.5)
            atomic_write(metrics_path, lambda tmp, v=values: tmp.write_text(json.dumps(v, indent=1)))
        results[name] = values
    lines = ["| setting | " + " | ".join(HEADLINE) + " | mean abs pixel diff vs fp32 ([-1, 1] scale) |",
             "|---|" + "---|" * (len(HEADLINE) + 1)]
    for name, values in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{values.get(k, float('nan')):.4f}" for k in HEADLINE)
                     + f" | {values['pixel_mean_abs_diff_vs_fp32']:.4f} |")
    table = "\n".join(lines)
    print(f"{args.num_samples} samples, DDPM {args.steps}, {'unguided' if args.unguided else 'ADM-G s=1'}\n{table}")
    atomic_write(args.out / "results.md", lambda tmp: tmp.write_text(table + "\n"))
    atomic_write(args.out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))


if __name__ == "__main__":
    main()
