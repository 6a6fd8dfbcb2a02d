"""Report of the tail study (`python tools/tail_study.py report`): tables, the PROTOCOL.md verdicts, plots, grids.

Reads every finished unit's record under ``--records`` (one JSON per unit: provenance + metrics) and writes to
``--docs``:
``results.csv`` (one row per run and sample size: mean, std, seed sets),
``results.md`` (the table, the verdicts, the selection and the headline rows against the ADM-G headline rows,
paired by seed set), ``<space>_<y>_vs_<x>.png`` (the ADM-G curve drawn, error bars,
numbered points with a legend so labels never overlap) and ``grid_<run>.png`` for the headline runs.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from tailgen.metrics.frontier import margin_over_curve

# metric names per feature space (prefix in metrics.json); fidelity axes and diversity metrics of the rule
DEFAULT_REPORT = {
    "spaces": {"domain": "", "judge": "judge/"},
    "accuracy": "tail/accuracy",
    "fid": "fid",
    "diversity": ["recall", "coverage", "classwise/coverage_mean", "rarity"],
    "plots": [["fid", "recall"], ["accuracy", "classwise/coverage_mean"], ["fid", "rarity"],
              ["accuracy", "fid"]],  # the last: the fidelity plane (how each row buys class accuracy in FID)
}


def collect(records: Path) -> list[dict]:
    """Every finished unit: ``<records>/<run>/n<N>_s<seed>.json`` (written last and atomically by the driver)."""
    return [json.loads(p.read_text()) for p in sorted(records.glob("*/n*_s*.json"))]


def metric_keys(cfg: dict) -> list[str]:
    """The reported metrics, in table order: class accuracy, then per feature space FID and the diversity metrics."""
    return [cfg["accuracy"]] + [p + k for p in cfg["spaces"].values() for k in [cfg["fid"], *cfg["diversity"]]]


def aggregate(units: list[dict]) -> dict[tuple[str, int], dict]:
    """(run, N) -> {"info": first unit, "seeds": [..] (ascending), "by_seed": {k: [v per seed set]},
    "mean": {k: v}, "std": {k: v} (NaN with one seed set)}."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for unit in sorted(units, key=lambda u: u["seed"]):
        groups.setdefault((unit["run"], unit["num_samples"]), []).append(unit)
    table = {}
    for key, members in groups.items():
        names = sorted(set.intersection(*(set(m["metrics"]) for m in members)))
        values = {k: np.array([m["metrics"][k] for m in members], dtype=float) for k in names}
        table[key] = {"info": members[0], "seeds": [m["seed"] for m in members],
                      "by_seed": {k: v.tolist() for k, v in values.items()},
                      "mean": {k: float(v.mean()) for k, v in values.items()},
                      "std": {k: float(v.std(ddof=1)) if len(v) > 1 else math.nan for k, v in values.items()}}
    return table


def seed_noise(table: dict, headline_n: int, n: int, min_seeds: int = 3) -> dict[str, float]:
    """sigma per metric for samples of size ``n``: the largest seed-set std among the headline rows, scaled by
    sqrt(headline_n / n) (PROTOCOL.md). Only rows with all the protocol's ``min_seeds`` seed sets count (a std of
    two values can be ~0 by chance); empty until one has them."""
    sigma: dict[str, float] = {}
    for (run, size), row in table.items():
        if size != headline_n or len(row["seeds"]) < min_seeds:
            continue
        for k, s in row["std"].items():
            sigma[k] = max(sigma.get(k, 0.0), s)
    return {k: s * math.sqrt(headline_n / n) for k, s in sigma.items()}


def verdicts(plan: dict, table: dict, cfg: dict) -> dict[tuple[str, int], dict]:
    """Per (run, N): per space and axis, the margin over the ADM-G curve (tailgen.metrics.frontier)."""
    curve_method, headline_n = plan.get("curve", "adm_g"), plan["setting"]["headline"]["num_samples"]
    out = {}
    for (run, n), row in table.items():
        if row["info"]["method"] == curve_method:
            continue  # the curve itself is the reference, not a candidate
        named = [(name, r["mean"]) for (name, size), r in sorted(
            ((k, v) for k, v in table.items() if v["info"]["method"] == curve_method and k[1] == n),
            key=lambda kv: kv[1]["info"]["value"])]  # the curve's points in the order of its scale
        curve = [mean for _, mean in named]
        sigma = seed_noise(table, headline_n, n, len(plan["setting"]["headline"]["seeds"]))
        result = {}
        for space, prefix in cfg["spaces"].items():
            diversity = [prefix + d for d in cfg["diversity"]]
            for axis in ("accuracy", "fid"):
                fidelity = cfg["accuracy"] if axis == "accuracy" else prefix + cfg["fid"]
                needed = [fidelity, *diversity]
                if len(curve) < 2 or any(k not in row["mean"] or any(k not in p for p in curve) for k in needed):
                    continue
                if not all(d in sigma for d in diversity):
                    result[f"{space}/{axis}"] = {"comparable": None}
                    continue
                v = result[f"{space}/{axis}"] = margin_over_curve(curve, row["mean"], fidelity, diversity, sigma)
                if not v["comparable"]:
                    v["nearest"] = nearest_curve_point(named, row["mean"], fidelity, diversity, sigma)
        out[(run, n)] = result
    return out


def nearest_curve_point(named: list, candidate: dict, fidelity: str, diversity: list[str], sigma: dict) -> dict:
    """For a candidate outside the curve's fidelity range (no verdict by the rule): the curve point with the closest
    fidelity, the range, and z = (D(C) - D(point)) / sigma, so that "not comparable" still says where it stands
    (descriptive only; PROTOCOL.md's verdict stays "not comparable")."""
    f, values = candidate[fidelity], [p[fidelity] for _, p in named]
    run, point = min(named, key=lambda kv: abs(kv[1][fidelity] - f))
    return {"run": run, "value": f, "fidelity": point[fidelity], "range": [min(values), max(values)],
            "z": {d: (candidate[d] - point[d]) / sigma[d] for d in diversity if sigma.get(d)}}


def headline_differences(plan: dict, table: dict, cfg: dict) -> list[dict]:
    """The headline rows (N = 5,000, every seed set) against each ADM-G row of that size, **paired by seed set**
    (seed set k draws the same per-sample seeds in every row): per metric, delta = row - reference, its mean and
    std over the seed sets, and z = mean delta / sigma (sigma: the PROTOCOL.md seed-set std at that N, the
    largest among the headline rows). A curve row is compared only with the curve rows of lower scale. This is
    the error bar of each headline claim; the rule's verdicts stay on the interpolated curve (``verdicts``)."""
    curve_method, headline = plan.get("curve", "adm_g"), plan["setting"]["headline"]
    n, seeds = headline["num_samples"], sorted(headline["seeds"])
    sigma = seed_noise(table, n, n, len(seeds))
    keys = metric_keys(cfg)
    rows = {run: row for (run, size), row in table.items() if size == n and row["seeds"] == seeds}
    out = []
    for ref, ref_row in rows.items():
        if ref_row["info"]["method"] != curve_method:
            continue
        for run, row in rows.items():
            if run == ref or (row["info"]["method"] == curve_method
                              and row["info"]["value"] <= ref_row["info"]["value"]):
                continue
            delta = {}
            for k in keys:
                if k in row["by_seed"] and k in ref_row["by_seed"]:
                    d = np.array(row["by_seed"][k]) - np.array(ref_row["by_seed"][k])
                    delta[k] = {"mean": float(d.mean()), "std": float(d.std(ddof=1)),
                                "z": float(d.mean() / sigma[k]) if sigma.get(k) else math.nan}
            out.append({"run": run, "reference": ref, "n": n, "delta": delta})
    return out


def off_manifold(plan: dict, table: dict, cfg: dict) -> dict[tuple[str, int], list[str]]:
    """Per candidate (run, N): the feature spaces where its share of samples inside no real k-NN ball
    (``rarity_outside``) exceeds the ADM-G curve's largest share by more than 2 sigma (PROTOCOL.md: rarity bought
    with off-manifold samples is not a win). Empty until the seed-set noise exists."""
    curve_method, headline = plan.get("curve", "adm_g"), plan["setting"]["headline"]
    flags: dict[tuple[str, int], list[str]] = {}
    for (run, n), row in table.items():
        if row["info"]["method"] == curve_method:
            continue
        sigma = seed_noise(table, headline["num_samples"], n, len(headline["seeds"]))
        for space, prefix in cfg["spaces"].items():
            key = prefix + "rarity_outside"
            curve = [r["mean"][key] for (_, size), r in table.items()
                     if r["info"]["method"] == curve_method and size == n and key in r["mean"]]
            if curve and key in row["mean"] and key in sigma and row["mean"][key] > max(curve) + 2 * sigma[key]:
                flags.setdefault((run, n), []).append(space)
    return flags


def ranking(plan: dict, table: dict, verdict: dict, flags: dict) -> dict[str, list[dict]]:
    """Per group (``tail``: the plan's ``tail_methods``; ``competitor``: every other non-curve method) the grid rows
    by mean z over the four diversity metrics on the class-accuracy axis in judge features, largest first, among
    rows whose accuracy lies within the ADM-G curve's range and which are not flagged off-manifold: each
    ``{"run", "n", "mean_z"}``. Its head is the pick; its top two are the contenders (PROTOCOL.md, session 9)."""
    tail = set(plan.get("tail_methods", []))
    grid_n = plan["setting"]["grid"]["num_samples"]
    ranked: dict[str, list[dict]] = {}
    for (run, n), result in verdict.items():
        v = result.get("judge/accuracy") or {}
        if n != grid_n or not v.get("comparable") or flags.get((run, n)):
            continue
        group = "tail" if table[(run, n)]["info"]["method"] in tail else "competitor"
        ranked.setdefault(group, []).append({"run": run, "n": n, "mean_z": float(np.mean(list(v["z"].values())))})
    return {group: sorted(rows, key=lambda r: -r["mean_z"]) for group, rows in ranked.items()}


def picks(plan: dict, table: dict, verdict: dict, flags: dict) -> dict[str, dict]:
    """PROTOCOL.md "Choosing the shipped configurations": per group the head of :func:`ranking`
    (``{group: {"run", "n", "mean_z"}}``; a group is missing while no row qualifies, e.g. before the seed-set noise
    exists). ``adm_g``: the curve's guided scale (s > 0) with the lowest domain FID at the grid's N
    (``configs/fashion/adm_g.yaml``), ``{"run", "n", "fid"}``."""
    grid_n = plan["setting"]["grid"]["num_samples"]
    best = {group: rows[0] for group, rows in ranking(plan, table, verdict, flags).items()}
    scales = [(row["mean"]["fid"], run) for (run, n), row in table.items() if n == grid_n and "fid" in row["mean"]
              and row["info"]["method"] == plan["curve"] and row["info"]["value"]]  # s = 0 is no guidance
    if scales:
        fid, run = min(scales)
        best["adm_g"] = {"run": run, "n": grid_n, "fid": fid}
    return best


def _cell(row: dict, key: str) -> str:
    if key not in row["mean"]:
        return "-"
    m, s = row["mean"][key], row["std"][key]
    return f"{m:.3f}" if math.isnan(s) else f"{m:.3f} ± {s:.3f}"


def write_tables(table: dict, verdict: dict, cfg: dict, docs: Path, flags: dict | None = None,
                 chosen: dict | None = None, differences: list[dict] | None = None,
                 noise: dict[int, dict[str, float]] | None = None, ranked: dict | None = None) -> None:
    keys = metric_keys(cfg)
    with open(docs / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "num_samples", "seed_sets"] + [f"{k}{s}" for k in keys for s in ("", "_std")])
        for (run, n), row in table.items():
            w.writerow([run, n, len(row["seeds"])] + [row[s].get(k, "") for k in keys for s in ("mean", "std")])
    lines = ["| run | N x seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for (run, n), row in table.items():
        lines.append(f"| {run} | {n} x {len(row['seeds'])} | " + " | ".join(_cell(row, k) for k in keys) + " |")
    for n, sigma in sorted((noise or {}).items()):  # the z denominators (PROTOCOL.md rule 3)
        lines += ["", f"Seed-set sigma at N={n}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(sigma.items())
                                                             if k in keys)]
    lines += ["", "Verdicts (PROTOCOL.md): z = (D - D_ref) / sigma per diversity metric; above = every z > 2.", ""]
    for (run, n), result in verdict.items():
        for where, v in result.items():
            if v.get("comparable") is None:
                lines.append(f"- {run} (N={n}) {where}: pending (no seed-set noise measured yet)")
            elif not v["comparable"] and not v.get("nearest"):
                lines.append(f"- {run} (N={n}) {where}: not comparable (fidelity outside the ADM-G curve)")
            elif not v["comparable"]:
                near = v["nearest"]
                zs = ", ".join(f"{k} {z:+.1f}" for k, z in near["z"].items())
                lines.append(f"- {run} (N={n}) {where}: not comparable (fidelity {near['value']:.3f} outside the "
                             f"ADM-G curve's {near['range'][0]:.3f}-{near['range'][1]:.3f}; descriptive, vs the nearest "
                             f"curve point {near['run']} at {near['fidelity']:.3f}: {zs})")
            else:
                zs = ", ".join(f"{k} {z:+.1f}" for k, z in v["z"].items())
                lines.append(f"- {run} (N={n}) {where}: {'ABOVE' if v['above'] else 'not above'} ({zs})")
    for (run, n), spaces in (flags or {}).items():
        lines.append(f"- {run} (N={n}): OFF-MANIFOLD flag in {', '.join(spaces)} features (share of samples inside "
                     f"no real ball > the ADM-G curve's largest + 2 sigma)")
    lines += ["", "Selection (PROTOCOL.md: largest mean z, class-accuracy axis, judge features, comparable, "
              "not flagged):"]
    for group in ("tail", "competitor"):
        c = (chosen or {}).get(group)
        lines.append(f"- best {group}: " + (f"{c['run']} (N={c['n']}, mean z {c['mean_z']:+.2f})" if c
                                             else "none yet (no comparable row with seed-set noise)"))
    for group, rows in (ranked or {}).items():
        lines.append(f"- {group} ranking (the top two are the contenders, PROTOCOL.md session 9): "
                     + ", ".join(f"{r['run']} {r['mean_z']:+.2f}" for r in rows[:5]))
    if c := (chosen or {}).get("adm_g"):
        lines.append(f"- ADM-G scale with the lowest domain FID at N={c['n']} (configs/fashion/adm_g.yaml): {c['run']} "
                     f"(FID {c['fid']:.3f})")
    if differences:
        n = differences[0]["n"]
        lines += ["", f"Headline rows, paired by seed set (N={n}): delta = row - reference, mean ± std over the seed "
                  "sets [z = mean delta / sigma, the PROTOCOL.md seed-set std at this N]", "",
                  "| row | reference | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for d in differences:
            cells = [(f"{v['mean']:+.3f} ± {v['std']:.3f} [{v['z']:+.1f}]" if k in d["delta"] else "-")
                     for k in keys for v in [d["delta"].get(k, {})]]
            lines.append(f"| {d['run']} | {d['reference']} | " + " | ".join(cells) + " |")
    (docs / "results.md").write_text("\n".join(lines) + "\n")


def readme_markers(model: str) -> tuple[str, str]:
    """The README lines around the generated table of one model's records (``model_<sha256[:10]>``): one table per
    model, so that no table mixes two models."""
    return (f"<!-- tail-study table {model}: generated by `python tools/tail_study.py report` from "
            f"docs/tail_study/units/{model} -->", f"<!-- /tail-study table {model} -->")


README_COLUMNS = [("class acc", "tail/accuracy"), ("FID", "fid"), ("recall", "recall"), ("judge FD", "judge/fid"),
                  ("judge recall", "judge/recall"), ("judge class-wise cov.", "judge/classwise/coverage_mean"),
                  ("judge rarity", "judge/rarity")]


def _verdict_word(v: dict | None) -> str:
    if v is None:
        return "-"
    if v.get("comparable") is None:
        return "pending"
    if not v["comparable"]:
        return "n/c"
    return "**above**" if v["above"] else "no"


def readme_block(table: dict, verdict: dict, cfg: dict, model: str) -> str:
    """The README's tail-study table: one row per (run, N), mean ± seed-set std, and the PROTOCOL.md verdict per
    feature space on the accuracy / FID axes (above, no, n/c = fidelity outside the ADM-G curve, pending = no
    seed-set noise measured yet), between the markers of ``model``."""
    begin, end = readme_markers(model)
    head = [c for c, _ in README_COLUMNS] + [f"{space}: acc / FID axis" for space in cfg["spaces"]]
    lines = [begin, "", "| run | N x seed sets | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for (run, n), row in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = [_cell(row, key) for _, key in README_COLUMNS]
        v = verdict.get((run, n), {})
        cells += [" / ".join(_verdict_word(v.get(f"{space}/{axis}")) for axis in ("accuracy", "fid"))
                  if (run, n) in verdict else "(curve)" for space in cfg["spaces"]]
        lines.append(f"| {run} | {n} x {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", end])


def update_readme(readme: Path, block: str, model: str) -> None:
    """Replace the README's generated tail-study block of ``model`` (between its markers) with ``block``."""
    begin, end = readme_markers(model)
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"tail_study report: {readme} has no table for {model}; add the two lines {begin} and {end} "
                         "where it belongs and rerun")
    head, rest = text.split(begin, 1)
    readme.write_text(head + block + rest.split(end, 1)[1])


def plot(plan: dict, table: dict, cfg: dict, docs: Path, n: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k[0], v) for k, v in table.items() if k[1] == n]
    sigma = seed_noise(table, plan["setting"]["headline"]["num_samples"], n, len(plan["setting"]["headline"]["seeds"]))
    written = []
    for space, prefix in cfg["spaces"].items():
        for x_name, y_name in cfg["plots"]:
            xk = cfg["accuracy"] if x_name == "accuracy" else prefix + cfg.get(x_name, x_name)
            yk = prefix + y_name
            pts = [(run, r) for run, r in rows if xk in r["mean"] and yk in r["mean"]]
            if not pts:
                continue
            fig, ax = plt.subplots(figsize=(8, 5.5))
            curve = sorted([(r["info"]["value"], r["mean"][xk], r["mean"][yk]) for run, r in pts
                            if r["info"]["method"] == plan.get("curve", "adm_g")])
            if curve:
                ax.plot([c[1] for c in curve], [c[2] for c in curve], "k-", lw=1, label="ADM-G scale curve", zorder=1)
            methods = sorted({r["info"]["method"] for _, r in pts})
            colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
            for i, (run, r) in enumerate(pts, 1):
                ex = r["std"].get(xk) if not math.isnan(r["std"].get(xk, math.nan)) else sigma.get(xk)
                ey = r["std"].get(yk) if not math.isnan(r["std"].get(yk, math.nan)) else sigma.get(yk)
                ax.errorbar(r["mean"][xk], r["mean"][yk], xerr=ex, yerr=ey, fmt="o", ms=5, capsize=2,
                            color=colors[r["info"]["method"]], label=f"{i}: {run}", zorder=2)
                ax.annotate(str(i), (r["mean"][xk], r["mean"][yk]), xytext=(3, 3), textcoords="offset points",
                            fontsize=7)
            ax.set_xlabel(f"{x_name} ({'clean classifier' if x_name == 'accuracy' else space + ' features'})")
            ax.set_ylabel(f"{y_name} ({space} features)")
            ax.set_title(f"{y_name} vs {x_name}, {space} features, N={n} (error bars: seed-set std)", fontsize=9)
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(pts) // 30)
            fig.tight_layout()
            path = docs / f"{space}_{y_name.replace('/', '_')}_vs_{x_name}_n{n}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def rarest_on_manifold(images: np.ndarray, labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
                       extractor, k: int = 3, per_class: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the ``per_class`` samples with the largest rarity score (Han et al. 2023) among those inside at
    least one real k-NN ball of their own class (on-manifold), in ``extractor``'s feature space; rarest first.
    ``images`` (N x H x W x C) and ``real`` (N x H x W or N x H x W x C) are uint8."""
    import torch

    from tailgen.metrics.reference import extract_features
    from tailgen.metrics.tail_manifold import rarity_scores

    def nchw(x: np.ndarray) -> torch.Tensor:  # samples.npz / Fashion-MNIST are N x H x W (x C), uint8
        x = torch.from_numpy(np.ascontiguousarray(x))
        return (x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous()

    fake_f, real_f = extract_features(extractor, nchw(images))["pool"], extract_features(extractor, nchw(real))["pool"]
    picked, picked_labels = [], []
    for c in np.unique(labels):
        score = rarity_scores(real_f[torch.from_numpy(real_labels == c)], fake_f[torch.from_numpy(labels == c)], k=k)
        score = torch.nan_to_num(score, nan=-1.0).numpy()  # NaN = inside no ball: off-manifold, never picked
        order = [i for i in np.argsort(-score, kind="stable") if score[i] >= 0][:per_class]
        picked.append(images[labels == c][order])
        picked_labels += [c] * len(order)
    return np.concatenate(picked), np.array(picked_labels)


def grids(plan: dict, table: dict, docs: Path, out: Path) -> None:
    """For each headline run whose samples (seed set 0) are still on this disk: ``grid_<run>.png`` (one labelled
    row per class) and ``rarest_<run>.png`` (per class the rarest on-manifold samples, judge features)."""
    from tailgen.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
    from tailgen.metrics.features import ClassifierFeatures
    from tailgen.models.spec import NetworkSpec
    from tailgen.utils.images import class_grid, save_png

    headline_n = plan["setting"]["headline"]["num_samples"]
    judge = None
    for (run, n), row in table.items():
        samples = out / run.replace("@", "_").replace("+", "__") / f"n{n}_s0" / "samples.npz"
        if n != headline_n or not samples.exists():
            continue
        data = np.load(samples)
        images, labels = data["arr_0"], data["arr_1"]
        stem = run.replace("@", "_").replace("+", "__")
        save_png(class_grid(images, labels, CLASS_NAMES, per_class=12), docs / f"grid_{stem}.png")
        if judge is None:
            judge = ClassifierFeatures(NetworkSpec(preset="fashion_judge").build(), timestep=0, name="fashion_judge")
            real, real_labels = load_fashion_mnist("test")
            real, real_labels = real[:n], real_labels[:n]  # the study's equal-size reference
        rare, rare_labels = rarest_on_manifold(images, labels, real, real_labels, judge)
        save_png(class_grid(rare, rare_labels, CLASS_NAMES, per_class=12), docs / f"rarest_{stem}.png")


def study_table(plan: dict, records: Path) -> tuple[dict, dict, dict]:
    """``(table, verdict, cfg)`` of the finished units under ``records``."""
    cfg = {**DEFAULT_REPORT, **plan.get("report", {})}
    units = collect(records)
    if not units:
        raise SystemExit(f"tail_study report: no finished unit under {records}")
    table = aggregate(units)
    return table, verdicts(plan, table, cfg), cfg


def report(plan: dict, records: Path, docs: Path, out: Path, readme: Path | None = None) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    table, verdict, cfg = study_table(plan, records)
    flags = off_manifold(plan, table, cfg)
    chosen = picks(plan, table, verdict, flags)
    headline = plan["setting"]["headline"]
    noise = {n: seed_noise(table, headline["num_samples"], n, len(headline["seeds"]))
             for n in sorted({n for _, n in table})}
    write_tables(table, verdict, cfg, docs, flags, chosen, headline_differences(plan, table, cfg), noise,
                 ranking(plan, table, verdict, flags))
    selection = {group: {**c, "guidances": plan["_runs"][c["run"]]["guidances"]} for group, c in chosen.items()
                 if c["run"] in plan.get("_runs", {})}
    (docs / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")  # tests: tail.yaml == the tail pick
    for n in sorted({n for _, n in table}):
        plot(plan, table, cfg, docs, n)
    grids(plan, table, docs, out)
    if readme is not None:
        update_readme(readme, readme_block(table, verdict, cfg, records.name), records.name)
    print((docs / "results.md").read_text())
