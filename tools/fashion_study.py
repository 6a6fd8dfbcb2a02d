"""Tail study on the Fashion-MNIST default: the same samples budget, seeds and labels for every guidance setting,
measured by `tailgen test` (domain features of the shipped clean classifier vs the test split).

    python tools/fashion_study.py --num-samples 500 --steps 25 --out outputs/fashion_study [--runs plain adm_g ...]

Each run is `tailgen test --config configs/fashion/default.yaml --config configs/fashion/eval.yaml` plus the flags
below (its guidances replaced as a whole), so any row can be reproduced by hand. Writes ``<out>/<run>/metrics.json``,
``<out>/results.md`` (the table) and ``<out>/recall_vs_fid.png``. Runs that already have metrics.json are skipped
(a killed study resumes where it stopped).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from tailgen.cli import main as tailgen

ROOT = Path(__file__).resolve().parents[1]
CG = {"class_path": "tailgen.guidance.ClassifierGuidance", "init_args": {"scale": 1.0}}


def tail(variant: str = "target", scale: float = 2.0, **kw) -> dict:
    return {"class_path": "tailgen.guidance.LowDensityGuidance",
            "init_args": {"variant": variant, "scale": scale, "form": "mean", **kw}}


PULL = {"class_path": "tailgen.guidance.PredictedImagePull", "init_args": {"variant": "snr_pull", "scale": 0.02}}
CFG = {"class_path": "tailgen.guidance.ClassifierFreeGuidance", "init_args": {"scale": 1.0, "null_label": 10}}

RUNS: dict[str, dict] = {
    "plain": {},
    "adm_g_s1": {"cg": CG},
    "adm_g_s3": {"cg": {**CG, "init_args": {"scale": 3.0}}},
    "cfg_w1": {"cfg": CFG},
    "tail_target_s2": {"cg": CG, "tail": tail("target", 2.0, target_confidence=0.5)},
    "tail_target_s8": {"cg": CG, "tail": tail("target", 8.0, target_confidence=0.5)},
    "tail_entropy": {"cg": CG, "tail": tail("entropy", 1.0, lam=2.0)},
    "tail_complement_capped": {"cg": CG, "tail": tail("complement", 1.0, lam=1.0, max_norm=0.05, t_min=0.2)},
    "tail_target_x0": {"cg": CG, "tail": tail("target", 2.0, target_confidence=0.5), "x0": PULL},
}
COLUMNS = ("fid", "precision", "recall", "density", "coverage", "classwise/recall_mean", "classwise/coverage_mean",
           "classwise/fid_mean", "tail/accuracy", "tail/confidence", "tail/low_conf_share")


def run(name: str, guidances: dict, args) -> dict:
    out = Path(args.out) / name
    metrics = (out / "metrics.json").resolve()
    if metrics.exists():
        return json.loads(metrics.read_text())
    out.mkdir(parents=True, exist_ok=True)
    overlay = out / "guidances.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"guidances": guidances,
                                                               "progress": False}}}))
    tailgen(["test", "--config", str(ROOT / "configs/fashion/default.yaml"), "--config", str(ROOT / "configs/fashion/eval.yaml"),
             "--config", str(overlay), f"--data.init_args.num_samples={args.num_samples}",
             f"--data.init_args.batch_size={args.batch_size}", f"--data.init_args.seed={args.seed}",
             f"--model.init_args.diffusion={{timestep_respacing: '{args.steps}'}}",
             f"--model.init_args.evaluation.init_args.output={metrics}",
             f"--model.init_args.evaluation.init_args.max_reference={args.max_reference or 'null'}",
             "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}"])
    return json.loads(metrics.read_text())


def report(results: dict[str, dict], out: Path) -> None:
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, values in results.items():
        cells = [f"{values[c]:.4f}" if values.get(c) is not None else "-" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, y in zip(axes, ("recall", "classwise/coverage_mean")):
        for name, values in results.items():
            if values.get(y) is None or values.get("fid") is None:
                continue
            ax.scatter(values["fid"], values[y])
            ax.annotate(name, (values["fid"], values[y]), fontsize=7)
        ax.set_xlabel("FID (domain features)")
        ax.set_ylabel(y)
    fig.tight_layout()
    fig.savefig(out / "recall_vs_fid.png", dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/fashion_study")
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-reference", type=int, default=None,
                    help="first N test images as the real set (k-NN recall is biased when the sizes differ a lot)")
    ap.add_argument("--runs", nargs="*", default=list(RUNS))
    args = ap.parse_args(argv)
    from tqdm import tqdm

    results = {name: run(name, RUNS[name], args) for name in tqdm(args.runs, desc="study")}
    report(results, Path(args.out))


if __name__ == "__main__":
    main()
