"""The base-model rule of docs/tail_study/PROTOCOL.md: the shipped vs the continued Fashion model, unguided,
2,000 samples x seed sets 0, 1, 2 each (the study's unit), mean ± seed-set std and z = diff / sqrt(s1^2/3 + s2^2/3).

    python tools/tail_study.py run --plan docs/tail_study/base_model/plan_shipped.yaml --out runs/base_model \\
        --records docs/tail_study/base_model --docs runs/base_model          # and plan_continued.yaml
    python tools/compare_base_models.py
"""
import json
from pathlib import Path

from tail_study_report import aggregate, collect

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "docs/tail_study/base_model"
SHIPPED, CONTINUED = "model_b1ef130fdc", "model_01cfb35426"
KEYS = ["fid", "judge/fid", "precision", "recall", "coverage", "judge/precision", "judge/recall", "judge/coverage",
        "tail/accuracy", "rarity", "judge/rarity"]


def unguided(model: str) -> dict:
    """The model's unguided row at 2,000 samples (mean, std over its seed sets) from the tail study's aggregate."""
    units = collect(UNITS / model)
    if model == SHIPPED:  # its seed set 0 is the tail study's grid unit
        units.append(json.loads((ROOT / "docs/tail_study/units" / model / "adm_g_0/n2000_s0.json").read_text()))
    return aggregate(units)[("adm_g@0", 2000)]


def main() -> None:
    old, new = unguided(SHIPPED), unguided(CONTINUED)
    print(f"seed sets: shipped {old['seeds']}, continued {new['seeds']}")
    print(f"{'metric':16s} {'shipped':>16s} {'continued':>16s} {'diff':>8s} {'z':>6s}")
    for key in KEYS:
        sigma = (old["std"][key] ** 2 / len(old["seeds"]) + new["std"][key] ** 2 / len(new["seeds"])) ** 0.5
        diff = new["mean"][key] - old["mean"][key]
        print(f"{key:16s} {old['mean'][key]:8.4f}±{old['std'][key]:.4f} {new['mean'][key]:8.4f}±"
              f"{new['std'][key]:.4f} {diff:+8.4f} {diff / sigma:+6.1f}")


if __name__ == "__main__":
    main()
