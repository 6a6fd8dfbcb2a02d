"""Report of ``tools/toy_tail_study.py``: mean +- std over seed sets, the "above the ADM-G curve" verdict of
docs/tail_study/PROTOCOL.md transposed to the toy (:func:`axis_verdict`), ``results.md``, ``summary.json`` and the
figures ``rare_shares.png`` / ``diversity.png``.

The toy's rule, per fidelity axis F in :data:`AXES` (Bayes accuracy, pooled FD, class-conditional FD):

* curve = the ADM-G runs (s = 0, 0.25, ..., 4) in scale order, each point the mean over the seed sets;
* sigma_D = the largest seed-set std (ddof 1) of D among the curve's points and the candidate (the protocol's
  "largest std among the headline configurations"; on the toy every row has the same seed sets);
* a candidate is above the curve on F when ``margin_over_curve`` (tailgen.metrics.frontier: interpolated at
  F(C), conservative max where F is not monotone) finds D(C) - D_ref > 2 sigma_D for every D in
  :data:`DIVERSITY`; outside the curve's F range it is not comparable (``side`` says whether it lies beyond the
  curve's best or worst end, ``dominates`` whether, beyond the best end, every D also exceeds the curve's
  largest D by 2 sigma_D);
* it is reported as above the curve only if it is above on all three axes;
* rows whose off-manifold share exceeds max(the curve's largest, the true 1.11 %) by more than 2 sigma_off are
  flagged;
* sensitivity: the same verdict with sigma_D from the candidate and the unguided point only (``above_lenient``).

The rare-mode shares (rareA, rareB) get the same margin, reported beside the verdict (not part of it: more than
the true share is over-sampling, not diversity).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tailgen.data import toy
from tailgen.metrics.frontier import margin_over_curve

CURVE = "adm_g"
AXES = {"bayes_acc": "higher", "FD": "lower", "cFD": "lower"}  # fidelity axis -> which way is better
DIVERSITY = ("R", "C", "R_rare", "C_rare")
SHARES = ("rareA", "rareB")
K = 2.0
TRUE_OFF = toy.expected_shares()["off"]
METHOD_COLORS = {"adm_g": "black", "cfg": "tab:pink", "interval": "tab:red", "tail_target": "tab:green",
                 "tail_entropy": "tab:cyan", "calibrated_target": "tab:olive", "langevin_pull": "tab:orange",
                 "cads": "tab:purple", "sg_minority": "tab:brown", "hardness": "tab:blue"}


def aggregate(data: dict) -> dict[str, dict]:
    """``{run: {**description, "n", "mean": {metric: .}, "std": {metric: . (ddof 1; nan for one set)},
    "seconds"}}`` over the seed sets present, in the file's run order."""
    rows = {}
    for name, units in data["units"].items():
        keys = list(next(iter(units.values()))["metrics"])
        vals = {k: np.array([u["metrics"][k] for u in units.values()], dtype=float) for k in keys}
        n = len(units)
        rows[name] = {**data["runs"][name], "n": n, "seeds": sorted(units, key=int),
                      "mean": {k: float(v.mean()) for k, v in vals.items()},
                      "std": {k: float(v.std(ddof=1)) if n > 1 else math.nan for k, v in vals.items()},
                      "seconds": float(np.mean([u["sample_seconds"] for u in units.values()]))}
    return rows


def curve_rows(rows: dict[str, dict]) -> list[dict]:
    """The ADM-G points (alone, no combination) in scale order."""
    pts = [r for r in rows.values() if r["method"] == CURVE and r["adm_g"] is None]
    return sorted(pts, key=lambda r: r["value"])


def axis_verdict(curve: list[dict], cand: dict, axis: str, better: str = "higher",
                 diversity: tuple[str, ...] = DIVERSITY, k: float = K, sigma_rows: list[dict] | None = None) -> dict:
    """Where ``cand`` stands against ``curve`` on fidelity ``axis`` (rows with "mean" and "std" dicts; see the
    module docstring). sigma_D is the largest std of D among ``cand`` and ``sigma_rows`` (default: the curve's
    points). Returns ``margin_over_curve``'s dict plus ``sigma``, ``above_each`` {D: bool}, and for a candidate
    that is not comparable ``side`` ("better" / "worse") and ``dominates``."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    pool = [cand] + (curve if sigma_rows is None else list(sigma_rows))
    sigma = {d: max(r["std"][d] for r in pool) for d in diversity}
    if not all(math.isfinite(s) for s in sigma.values()):
        raise ValueError("a seed-set std is missing (one seed set only): the verdict needs at least two")
    res = margin_over_curve([p["mean"] for p in curve], cand["mean"], axis, diversity, sigma, k)
    res["sigma"] = sigma
    res["above_each"] = {d: res["z"][d] > k for d in res["z"]}
    if not res["comparable"]:
        fs, f = [p["mean"][axis] for p in curve], cand["mean"][axis]
        beyond_best = f > max(fs) if better == "higher" else f < min(fs)
        res["side"] = "better" if beyond_best else "worse"
        res["dominates"] = beyond_best and all(
            cand["mean"][d] - max(p["mean"][d] for p in curve) > k * sigma[d] for d in diversity)
    return res


def off_flag(curve: list[dict], cand: dict, k: float = K, floor: float = 0.0) -> bool:
    """Off-manifold share above max(the curve's largest, ``floor``) by more than k sigma_off (sigma as in
    ``axis_verdict``). On the toy ``floor`` is the true share (1.11 %): the model and the ADM-G curve sit below it
    (0.6-0.8 %), and a row that only matches the truth has bought nothing off the manifold."""
    sigma = max([cand["std"]["off"]] + [p["std"]["off"] for p in curve])
    return cand["mean"]["off"] - max([p["mean"]["off"] for p in curve] + [floor]) > k * sigma


def verdicts(rows: dict[str, dict]) -> dict[str, dict]:
    """Per candidate (every run not on the curve): each axis's verdict, the shares' margins, the flag, ``above``,
    and a sensitivity check ``above_lenient``: sigma_D from the candidate and the unguided point only (the curve's
    s = 0) instead of every curve point."""
    curve = curve_rows(rows)
    out = {}
    for name, r in rows.items():
        if r["method"] == CURVE and r["adm_g"] is None:
            continue
        axes = {a: axis_verdict(curve, r, a, b) for a, b in AXES.items()}
        shares = {a: axis_verdict(curve, r, a, b, diversity=SHARES) for a, b in AXES.items()}
        lenient = {a: axis_verdict(curve, r, a, b, sigma_rows=curve[:1]) for a, b in AXES.items()}
        out[name] = {"axes": axes, "shares": shares, "off_flag": off_flag(curve, r, floor=TRUE_OFF),
                     "above": all(v["above"] for v in axes.values()),
                     "above_any_axis": [a for a, v in axes.items() if v["above"]],
                     "above_lenient": all(v["above"] for v in lenient.values()),
                     "above_lenient_any_axis": [a for a, v in lenient.items() if v["above"]]}
    return out


# ------------------------------------------------------------------------------------------------ tables


def _pm(r: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    m, s = r["mean"][key] * scale, r["std"][key] * scale
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


TABLE = (("rareA %", "rareA", 100, 2), ("rareB %", "rareB", 100, 2), ("off %", "off", 100, 2),
         ("Bayes acc", "bayes_acc", 1, 4), ("P", "P", 1, 3), ("R", "R", 1, 4), ("C", "C", 1, 3),
         ("R rare", "R_rare", 1, 3), ("C rare", "C_rare", 1, 3), ("FD", "FD", 1, 4), ("cFD", "cFD", 1, 4))


def results_table(rows: dict[str, dict]) -> str:
    head = "| run | n | " + " | ".join(t[0] for t in TABLE) + " | s/unit |"
    lines = [head, "|" + "---|" * (len(TABLE) + 3)]
    for name, r in rows.items():
        cells = [_pm(r, key, scale, digits) for _, key, scale, digits in TABLE]
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cells) + f" | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _axis_cell(v: dict) -> str:
    if not v["comparable"]:
        return "dominates" if v.get("dominates") else f"n/c ({v['side']})"
    z = " ".join(f"**{v['z'][d]:+.1f}**" if v["above_each"][d] else f"{v['z'][d]:+.1f}" for d in v["z"])
    return ("ABOVE " if v["above"] else "") + z


def verdict_table(ver: dict[str, dict]) -> str:
    head = ("| run | " + " | ".join(f"{a}: z " + "/".join(DIVERSITY) for a in AXES)
            + " | " + " | ".join(f"{a}: z rareA/rareB" for a in AXES) + " | off flag | above | above (lenient σ) |")
    lines = [head, "|" + "---|" * (2 * len(AXES) + 4)]
    for name, v in ver.items():
        cells = [_axis_cell(v["axes"][a]) for a in AXES] + [_axis_cell(v["shares"][a]) for a in AXES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if v['off_flag'] else ''} | "
                     + ("**yes**" if v["above"] else "no") + " | "
                     + (", ".join(v["above_lenient_any_axis"]) or "no") + " |")
    return "\n".join(lines)


def markdown(data: dict, rows: dict, ver: dict | None) -> str:
    s = data["settings"]
    e = toy.expected_shares()
    seeds = sorted({x for r in rows.values() for x in r["seeds"]}, key=int)
    parts = ["# Toy tail study v2 (tools/toy_tail_study.py; generated by `report`)", "",
             (f"{s['num_samples']} samples per unit (labels i mod 3), DDPM {s['steps']} steps, x0_hat not clipped, "
              f"seed sets {', '.join(seeds)}; reference: an equal-size real set per seed set. Truth after the "
              f"3-sigma cut: rareA {100 * e['rareA']:.2f} %, rareB {100 * e['rareB']:.2f} %, "
              f"off {100 * e['off']:.2f} %. Cells: mean ± std (ddof 1) over the seed sets."), "", results_table(rows), "",
             "## Share of each rare mode reached (% of the true share)", "", reached_table(rows), ""]
    if ver is not None:
        parts += ["## Verdict against the ADM-G curve", "",
                  (f"z = (D - D_ref) / sigma_D per diversity metric (bold: z > {K:g}); ABOVE needs every z > {K:g} "
                   "on that axis, **yes** needs it on all three axes. n/c = outside the curve's fidelity range "
                   "(better / worse end). Lenient σ: the axes on which the row is above with sigma_D taken from the "
                   "row and the unguided point only."), "", verdict_table(ver), ""]
    return "\n".join(parts)


def reached_table(rows: dict[str, dict]) -> str:
    """Each rare mode's share as a percentage of its true share (6.92 / 2.97 % after the 3-sigma cut), alone and
    on top of ADM-G s=1, mean ± std over the seed sets."""
    e = toy.expected_shares()
    lines = ["| method | value | rare A reached % | rare B reached % | + ADM-G s=1: rare A % | + ADM-G s=1: rare B % |",
             "|---|---|---|---|---|---|"]

    def cell(r, key):
        if r is None:
            return ""
        m, sd = 100 * r["mean"][key] / e[key], 100 * r["std"][key] / e[key]
        return f"{m:.0f}" + ("" if math.isnan(sd) else f" ± {sd:.0f}")

    for name, r in rows.items():
        if r["adm_g"] is not None:
            continue
        combo = rows.get(f"{name}+{CURVE}@1")
        lines.append(f"| {r['method']} | {r['value']:g} | {cell(r, 'rareA')} | {cell(r, 'rareB')} | "
                     f"{cell(combo, 'rareA')} | {cell(combo, 'rareB')} |")
    return "\n".join(lines)


def summary_json(data: dict, rows: dict, ver: dict | None) -> str:
    """Small machine-readable summary, one line per run: mean/std of the table's metrics and the verdict."""
    keys = [t[1] for t in TABLE]

    def r4(x):
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(f"{x:.4g}")

    lines = []
    for n, r in rows.items():
        item = {"method": r["method"], "value": r["value"], "adm_g": r["adm_g"], "n": r["n"],
                "mean": {k: r4(r["mean"][k]) for k in keys}, "std": {k: r4(r["std"][k]) for k in keys}}
        if ver is not None and n in ver:
            v = ver[n]
            item["verdict"] = {
                "above": v["above"], "above_any_axis": v["above_any_axis"], "off_flag": v["off_flag"],
                "above_lenient_any_axis": v["above_lenient_any_axis"],
                "z": {a: ({d: r4(z) for d, z in v["axes"][a]["z"].items()} if v["axes"][a]["comparable"]
                          else v["axes"][a]["side"]) for a in AXES},
                "z_shares": {a: ({d: r4(z) for d, z in v["shares"][a]["z"].items()} if v["shares"][a]["comparable"]
                                 else v["shares"][a]["side"]) for a in AXES}}
        lines.append(f"  {json.dumps(n)}: {json.dumps(item)}")
    head = json.dumps({"settings": data["settings"], "rule": {"axes": AXES, "diversity": DIVERSITY, "k": K}})
    return head[:-1] + ', "rows": {\n' + ",\n".join(lines) + "\n}}\n"


# ------------------------------------------------------------------------------------------------ figures


def _xy(r: dict, key: str):
    if key == "bayes_err":
        return 1.0 - r["mean"]["bayes_acc"], r["std"]["bayes_acc"]
    return r["mean"][key], r["std"][key]


def tradeoff_figure(rows: dict, ykeys: list[tuple[str, str, float]], xkeys: list[tuple[str, str]], path: Path,
                    truth: dict | None = None, ylog: bool = False) -> None:
    """Grid of y vs x panels: the ADM-G curve (line, error bars, scale labels) and every other run (colour =
    method, o = alone, ^ = on top of ADM-G s=1, text = strength), error bars = seed-set std."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ykeys), len(xkeys), figsize=(5.2 * len(xkeys), 3.9 * len(ykeys)), squeeze=False)
    curve = curve_rows(rows)
    for i, (ykey, ylabel, yscale) in enumerate(ykeys):
        for j, (xkey, xlabel) in enumerate(xkeys):
            ax = axes[i][j]
            for r in rows.values():
                on_curve = r["method"] == CURVE and r["adm_g"] is None
                if on_curve:
                    continue
                (x, xe), (y, ye) = _xy(r, xkey), _xy(r, ykey)
                ax.errorbar(x, y * yscale, xerr=np.nan_to_num(xe), yerr=np.nan_to_num(ye) * yscale,
                            fmt="^" if r["adm_g"] is not None else "o", ms=4, lw=0.6, alpha=0.75,
                            color=METHOD_COLORS.get(r["method"], "gray"))
                ax.annotate(f"{r['value']:g}", (x, y * yscale), fontsize=5, alpha=0.7)
            cx = [_xy(r, xkey) for r in curve]
            cy = [_xy(r, ykey) for r in curve]
            ax.errorbar([a for a, _ in cx], [b * yscale for b, _ in cy], xerr=np.nan_to_num([e for _, e in cx]),
                        yerr=np.nan_to_num([e for _, e in cy]) * yscale, fmt="-s", color="black", ms=4, lw=1.4,
                        label="ADM-G curve", zorder=5)
            for r, (a, _), (b, _) in zip(curve, cx, cy):
                ax.annotate(f"s={r['value']:g}", (a, b * yscale), fontsize=6, fontweight="bold", zorder=6)
            if truth and ykey in truth:
                ax.axhline(truth[ykey] * yscale, ls="--", color="gray", lw=0.8, label="truth")
            if xkey in ("FD", "cFD", "bayes_err"):
                ax.set_xscale("symlog", linthresh={"FD": 1e-4, "cFD": 1e-3, "bayes_err": 1e-4}[xkey])
                ax.set_xlim(left=-0.2 * {"FD": 1e-4, "cFD": 1e-3, "bayes_err": 1e-4}[xkey])
            if ylog:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in METHOD_COLORS.items()
               if m != CURVE]
    handles += [plt.Line2D([], [], marker="s", color="black", label="ADM-G curve (s)"),
                plt.Line2D([], [], marker="^", ls="", color="gray", label="+ ADM-G s=1"),
                plt.Line2D([], [], ls="--", color="gray", label="truth")]
    fig.legend(handles=handles, loc="upper center", ncol=7, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.9 * len(ykeys))))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    rows = aggregate(data)
    ver = verdicts(rows) if all(r["n"] > 1 for r in rows.values()) and curve_rows(rows) else None
    (out / "results.md").write_text(markdown(data, rows, ver))
    (out / "summary.json").write_text(summary_json(data, rows, ver))
    e = toy.expected_shares()
    xkeys = [("bayes_err", "Bayes error 1 - acc (symlog)"), ("FD", "pooled FD (symlog)"),
             ("cFD", "class-conditional FD (symlog)")]
    tradeoff_figure(rows, [("rareA", "rare A share % (log)", 100), ("rareB", "rare B share % (log)", 100)], xkeys,
                    out / "rare_shares.png", truth={"rareA": e["rareA"], "rareB": e["rareB"]}, ylog=True)
    tradeoff_figure(rows, [(d, d.replace("_", " "), 1) for d in DIVERSITY], xkeys, out / "diversity.png")
