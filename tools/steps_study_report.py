"""Report of the steps study (issue 11, "Quality per network call"): ``python tools/tail_study.py report --plan
configs/study/fashion_steps.yaml``.

Per guidance panel (unguided; ADM-G s=1), sampler (DDPM, DDIM eta=0, DPM-Solver++(2M) and its SDE form) and step
count K, the metrics of the finished units under ``records`` against the reference (``report.reference``: DDPM at 250 steps)
of the same panel. With ``sigma_m`` the seed-set noise of metric m at the study's N samples,

    z_m = (x_m - x_m,ref) / sigma_m,     a row matches  <=>  |z_m| <= tolerance (2)  for every m in report.match,

and the answer per (panel, sampler) is the smallest K whose row matches. The study has one seed set per unit, so
sigma comes from the tail study's unguided headline row (``report.noise``: run adm_g@0, 5,000 samples x 3 seed
sets): its seed-set std scaled by sqrt(5000 / N) (``tail_study_report.seed_noise``). The x axis counts UNet calls
per sample: one per step for every sampler (the DPM-Solvers reuse the previous step's x0_hat instead of a second
call); ADM-G adds one classifier forward + backward per step, not counted there.

Writes to ``docs``: ``results.md`` (sigma and its source, the answers, the table), ``results.csv`` (one row per
run: metrics, z, match) and ``quality_per_call.png`` (metrics vs UNet calls, log x; the reference +- tolerance
sigma as a band).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from tail_study import ROOT, model_out, network_calls
from tail_study_report import aggregate, collect, seed_noise

CALLS_PER_STEP = {"ddpm": 1, "ddim": 1, "dpmpp_2m": 1, "dpmpp_2m_sde": 1}  # UNet evaluations per step (tests/test_steps_study.py counts)
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "dpmpp_2m_sde": "SDE-DPM-Solver++(2M)"}
METRIC_NAMES = {"fid": "FID (domain)", "judge/fid": "FD (judge)", "recall": "recall (domain)",
                "judge/recall": "recall (judge)", "tail/accuracy": "class accuracy"}
DEFAULT = {
    "reference": {"sampler": "ddpm", "steps": 250},
    "metrics": ["fid", "judge/fid", "recall", "judge/recall", "tail/accuracy"],  # table and plot rows
    "match": ["fid", "recall", "tail/accuracy"],  # the metrics a row must match the reference on
    "tolerance": 2.0,  # in sigma
    "noise": {"records": "docs/tail_study/units", "run": "adm_g@0", "num_samples": 5000, "seeds": 3},
}


def sampler_of(info: dict) -> str:
    """The sampler a record ran (``sampling.sampler``; records without one ran the default, DDPM)."""
    return info.get("sampling", {}).get("sampler", "ddpm")


def unet_calls(sampler: str, steps) -> int:
    """UNet evaluations per sample of ``sampler`` over a respacing of ``steps``."""
    if sampler not in CALLS_PER_STEP:
        raise SystemExit(f"steps_study report: no network-call count for sampler {sampler!r}")
    return CALLS_PER_STEP[sampler] * network_calls(steps)


def panel_of(info: dict) -> str:
    """``unguided``, ``ADM-G s=<scale>`` (ADM-G added by ``with_adm_g``) or the run's method."""
    if not info["guidances"]:
        return "unguided"
    return f"ADM-G s={info['adm_g']:g}" if info.get("adm_g") is not None else info["method"]


def study_rows(table: dict, n: int) -> list[dict]:
    """One row per run at ``n`` samples: run, panel, sampler (+ eta), steps, UNet calls, seed sets, mean metrics."""
    rows = []
    for (run, size), row in table.items():
        if size != n:
            continue
        info, sampler = row["info"], sampler_of(row["info"])
        eta = info.get("sampling", {}).get("eta")
        rows.append({"run": run, "panel": panel_of(info), "sampler": sampler, "eta": eta,
                     "steps": info["steps"], "calls": unet_calls(sampler, info["steps"]), "seeds": row["seeds"],
                     "mean": row["mean"]})
    order = list(SAMPLER_NAMES)
    return sorted(rows, key=lambda r: (r["panel"] != "unguided", r["panel"],
                                       order.index(r["sampler"]) if r["sampler"] in order else len(order), r["calls"]))


def compare(rows: list[dict], sigma: dict, cfg: dict) -> dict[tuple[str, str], dict]:
    """Adds ``z`` (per metric with a sigma) and ``match`` (True / False / None = pending: no reference row, or a
    ``match`` metric without sigma) to every row; returns the answer per (panel, sampler): ``{"steps", "calls",
    "pending": [smaller step counts still pending]}``, ``{"steps": None, "pending": [...]}`` when none matches."""
    ref_sampler, ref_steps = cfg["reference"]["sampler"], network_calls(cfg["reference"]["steps"])
    tol = float(cfg["tolerance"])
    references = {r["panel"]: r for r in rows if r["sampler"] == ref_sampler and network_calls(r["steps"]) == ref_steps}
    answers: dict[tuple[str, str], dict] = {}
    for r in rows:
        ref = references.get(r["panel"])
        r["z"] = {m: (r["mean"][m] - ref["mean"][m]) / sigma[m] for m in cfg["metrics"] if ref is not None
                  and m in r["mean"] and m in ref["mean"] and sigma.get(m, 0) > 0}
        r["match"] = None if any(m not in r["z"] for m in cfg["match"]) else all(
            abs(r["z"][m]) <= tol for m in cfg["match"])
        answers.setdefault((r["panel"], r["sampler"]), {"steps": None, "calls": None, "pending": []})
    for key, answer in answers.items():
        for r in sorted((r for r in rows if (r["panel"], r["sampler"]) == key), key=lambda r: r["calls"]):
            if r["match"] is None:
                answer["pending"].append(r["steps"])
            elif r["match"]:
                answer.update(steps=r["steps"], calls=r["calls"])
                break
    return answers


def noise(cfg: dict, model: dict, n: int) -> tuple[dict[str, float], list[dict]]:
    """sigma per metric at ``n`` samples from ``cfg["noise"]`` (see the module docstring) and the units used."""
    spec = cfg["noise"]
    where = model_out(ROOT / spec["records"], model)
    units = [u for u in collect(where) if u["run"] == spec["run"] and u["num_samples"] == spec["num_samples"]]
    return seed_noise(aggregate(units), spec["num_samples"], n, spec["seeds"]) if units else {}, units


def _sampler_label(r: dict) -> str:
    name = SAMPLER_NAMES.get(r["sampler"], r["sampler"])
    return f"{name} (eta={r['eta']:g})" if r["sampler"] == "ddim" and r["eta"] is not None else name


def _answer_line(panel: str, label: str, answer: dict, cfg: dict, tested: list) -> str:
    ref = f"{SAMPLER_NAMES.get(cfg['reference']['sampler'], cfg['reference']['sampler'])}-{cfg['reference']['steps']}"
    head = f"- {panel}, {label}: "
    if answer["steps"] is None:
        if answer["pending"]:
            return head + f"pending (step counts {', '.join(map(str, answer['pending']))} not comparable yet)"
        return head + f"none of {', '.join(map(str, tested))} steps matches {ref}"
    line = head + f"**{answer['steps']} steps** ({answer['calls']} UNet calls per sample) match {ref}"
    if answer["pending"]:
        line += f" (provisional: {', '.join(map(str, answer['pending']))} steps pending)"
    return line


def write_tables(rows: list[dict], answers: dict, sigma: dict, noise_units: list[dict], cfg: dict, docs: Path,
                 n: int, model: dict | None = None) -> None:
    metrics, tol = cfg["metrics"], float(cfg["tolerance"])
    with open(docs / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "panel", "sampler", "eta", "steps", "unet_calls", "num_samples", "seed_sets",
                    *[c for m in metrics for c in (m, f"{m}_z")], "match"])
        for r in rows:
            w.writerow([r["run"], r["panel"], r["sampler"], "" if r["eta"] is None else r["eta"], r["steps"],
                        r["calls"], n, len(r["seeds"]),
                        *[c for m in metrics for c in (r["mean"].get(m, ""), r["z"].get(m, ""))],
                        "" if r["match"] is None else r["match"]])
    spec, ref = cfg["noise"], cfg["reference"]
    seeds = sorted(u["seed"] for u in noise_units)
    noise_steps = noise_units[0]["steps"] if noise_units else "?"
    noise_dir = spec["run"].replace("@", "_").replace("+", "__")
    ref_name = f"{SAMPLER_NAMES.get(ref['sampler'], ref['sampler'])}-{ref['steps']}"
    sha = (model or {}).get("weights_sha256") or "random"
    lines = [
        "# Quality per network call (issue 11)", "",
        (f"Generated by `python tools/tail_study.py report --plan configs/study/fashion_steps.yaml` from the unit "
        f"records (model `{sha[:10]}`): {n:,} samples per unit (balanced labels), one seed set each; metrics of "
        "`configs/fashion/eval_study.yaml` (domain = the clean classifier's features, judge = the independent "
        "judge network's; class accuracy by the clean classifier)."), "",
        (f"Reference: {ref_name} in each panel. A row **matches** when each of {', '.join(cfg['match'])} lies within "
        f"{tol:g} sigma of the reference: |z| <= {tol:g}, z = (x - x_ref) / sigma. The answer per panel and sampler "
        "is the smallest step count that matches. x axis: UNet calls per sample (one per step for "
        f"{', '.join(SAMPLER_NAMES.values())}); ADM-G adds one classifier forward + backward per step."), "",
        (f"sigma (seed-set noise at {n:,} samples): the tail study's unguided headline row `{spec['run']}` "
        f"({spec['num_samples']:,} samples x seed sets {seeds or 'none found'}, DDPM {noise_steps} steps; "
        f"`{spec['records']}/model_{sha[:10]}/{noise_dir}/n{spec['num_samples']}_s*.json`): the std over its seed "
        f"sets, scaled by sqrt({spec['num_samples']} / {n}). "
        "Both a row and the reference are single seed sets, so their difference has std about sigma x sqrt(2): a "
        f"row of truly equal quality passes one metric's {tol:g}-sigma test about "
        f"{math.erf(tol / 2):.0%} of the time (Gaussian)."), "",
        "| metric | sigma |", "|---|---|",
        *[f"| {m} | {sigma[m]:.4g} |" if m in sigma else f"| {m} | - (pending) |" for m in metrics],
        "", "## Answers", ""]
    for (panel, sampler), answer in answers.items():
        mine = [r for r in rows if (r["panel"], r["sampler"]) == (panel, sampler)]
        lines.append(_answer_line(panel, _sampler_label(mine[0]), answer, cfg, [r["steps"] for r in mine]))
    lines += ["", "## All runs", "", "Cells: value (z against the reference).", "",
              "| panel | sampler | steps | UNet calls | " + " | ".join(metrics) + " | matches |",
              "|---" * (len(metrics) + 5) + "|"]
    for r in rows:
        cells = [f"{r['mean'][m]:.4g} ({r['z'][m]:+.1f})" if m in r["z"] else
                 (f"{r['mean'][m]:.4g}" if m in r["mean"] else "-") for m in metrics]
        match = {None: "pending", True: "yes", False: "no"}[r["match"]]
        lines.append(f"| {r['panel']} | {_sampler_label(r)} | {r['steps']} | {r['calls']} | " + " | ".join(cells)
                     + f" | {match} |")
    (docs / "results.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], sigma: dict, cfg: dict, path: Path, n: int) -> None:
    """Metrics (rows) vs UNet calls per sample (log x) per panel (columns); the reference +- tolerance sigma band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    panels = list(dict.fromkeys(r["panel"] for r in rows))
    metrics, tol, ref = cfg["metrics"], float(cfg["tolerance"]), cfg["reference"]
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(5.2 * len(panels), 2.4 * len(metrics)),
                             sharex=True, squeeze=False)
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(SAMPLER_NAMES)}
    for j, panel in enumerate(panels):
        mine = [r for r in rows if r["panel"] == panel]
        reference = next((r for r in mine if r["sampler"] == ref["sampler"]
                          and network_calls(r["steps"]) == network_calls(ref["steps"])), None)
        for i, m in enumerate(metrics):
            ax = axes[i][j]
            if reference is not None and m in reference["mean"]:
                y = reference["mean"][m]
                ax.axhline(y, color="0.4", lw=0.8)
                if m in sigma:
                    ax.axhspan(y - tol * sigma[m], y + tol * sigma[m], color="0.85", zorder=0,
                               label=f"{SAMPLER_NAMES.get(ref['sampler'], ref['sampler'])}-{ref['steps']} "
                                     f"+- {tol:g} sigma")
            for sampler in dict.fromkeys(r["sampler"] for r in mine):
                pts = sorted((r["calls"], r["mean"][m], r) for r in mine if r["sampler"] == sampler and m in r["mean"])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, lw=1.2,
                            color=colors.get(sampler, "k"), label=_sampler_label(pts[0][2]))
            ax.set_xscale("log")
            ticks = sorted({r["calls"] for r in rows})
            ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel(METRIC_NAMES.get(m, m) + (" *" if m in cfg["match"] else ""), fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(panel, fontsize=10)
            if i == len(metrics) - 1:
                ax.set_xlabel("UNet calls per sample (log)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Quality per network call, Fashion-MNIST, N = {n:,} samples (one seed set per point; "
                 f"* = a metric the answer requires within {tol:g} sigma)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(plan: dict, records: Path, docs: Path) -> None:
    """The steps study's report of the finished units under ``records`` (already ``model_<sha>``) into ``docs``."""
    cfg = {**DEFAULT, **plan.get("report", {})}
    n = plan["setting"]["grid"]["num_samples"]
    units = collect(records)
    if not units:
        raise SystemExit(f"steps_study report: no finished unit under {records}")
    rows = study_rows(aggregate(units), n)
    sigma, noise_units = noise(cfg, plan["_model"], n)
    answers = compare(rows, sigma, cfg)
    docs.mkdir(parents=True, exist_ok=True)
    write_tables(rows, answers, sigma, noise_units, cfg, docs, n, plan["_model"])
    plot(rows, sigma, cfg, docs / "quality_per_call.png", n)
    print((docs / "results.md").read_text())
