"""The base-model rule of docs/tail_study/PROTOCOL.md: the shipped vs the continued Fashion model, unguided,
2,000 samples x seed sets 0, 1, 2 each (the study's unit), mean ± seed-set std and z = diff / sqrt(s1^2/3 + s2^2/3).

    python tools/tail_study.py run --plan docs/tail_study/base_model/plan_shipped.yaml --out runs/base_model \\
        --records docs/tail_study/base_model --docs runs/base_model          # and plan_continued.yaml
    python tools/compare_base_models.py
"""
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "docs/tail_study/base_model"
SHIPPED, CONTINUED = "model_b1ef130fdc", "model_01cfb35426"
KEYS = ["fid", "judge/fid", "precision", "recall", "coverage", "judge/precision", "judge/recall", "judge/coverage",
        "tail/accuracy", "rarity", "judge/rarity"]


def metrics(model: str) -> list[dict]:
    files = sorted((UNITS / model / "adm_g_0").glob("n2000_s*.json"))
    if model == SHIPPED:  # its seed set 0 is the tail study's grid unit
        files.insert(0, ROOT / "docs/tail_study/units" / model / "adm_g_0/n2000_s0.json")
    return [json.loads(f.read_text())["metrics"] for f in files]


def main() -> None:
    old, new = metrics(SHIPPED), metrics(CONTINUED)
    print(f"seed sets: shipped {len(old)}, continued {len(new)}")
    print(f"{'metric':16s} {'shipped':>16s} {'continued':>16s} {'diff':>8s} {'z':>6s}")
    for key in KEYS:
        a, b = [m[key] for m in old], [m[key] for m in new]
        sigma = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
        diff = statistics.mean(b) - statistics.mean(a)
        print(f"{key:16s} {statistics.mean(a):8.4f}±{statistics.stdev(a):.4f} {statistics.mean(b):8.4f}±"
              f"{statistics.stdev(b):.4f} {diff:+8.4f} {diff / sigma:+6.1f}")


if __name__ == "__main__":
    main()
