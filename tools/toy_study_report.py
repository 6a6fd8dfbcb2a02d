"""Report of ``tools/toy_study.py``: ``results.md`` (table), ``scatter.png``, ``recall_vs_fd.png``,
``crare_vs_cfd.png`` and ``rare_shares.png`` from the study's summary dict and samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tailgen.data import toy

COLUMNS = (  # (header, metric key, format, scale)
    ("rareA %", "rareA", "{:.2f}", 100), ("rareB %", "rareB", "{:.2f}", 100), ("off %", "off", "{:.2f}", 100),
    ("wrong-cls %", "wrong_class", "{:.2f}", 100), ("acc (Bayes)", "bayes_acc", "{:.4f}", 1),
    ("clf acc", "clf_acc", "{:.4f}", 1), ("clf conf", "clf_conf", "{:.3f}", 1), ("P", "P", "{:.3f}", 1),
    ("R", "R", "{:.4f}", 1), ("R rare", "R_rare", "{:.3f}", 1), ("D", "D", "{:.3f}", 1), ("C", "C", "{:.3f}", 1),
    ("C rare", "C_rare", "{:.3f}", 1), ("FD", "FD", "{:.4f}", 1), ("cFD", "cFD", "{:.4f}", 1),
)
FAMILY_COLORS = {"real (2nd draw)": "black", "base": "tab:gray", "ADM-G": "tab:red", "CFG": "tab:pink",
                 "(a) comp": "tab:brown", "(b) neg": "tab:olive", "(c) entropy": "tab:cyan",
                 "(d) damped": "tab:purple", "(e) target": "tab:green", "x0 (f)": "tab:orange",
                 "x0 (g)": "gold", "x0 (h)": "peru", "(i) x0-grad": "navy"}


def table(summary: dict) -> str:
    """Markdown table of every config (row order = run order)."""
    head = "| config | family | " + " | ".join(c[0] for c in COLUMNS) + " | s/cfg |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for name, r in summary["configs"].items():
        m = r["metrics"]
        cells = [fmt.format(m[key] * scale) for _, key, fmt, scale in COLUMNS]
        rows.append(f"| {name} | {r['family']} | " + " | ".join(cells) + f" | {r['sample_seconds']:.1f} |")
    return "\n".join(rows)


def markdown(summary: dict) -> str:
    s, rule = summary["settings"], summary["rule"]
    e = summary["truth"]["expected"]
    bt, bc = summary["best_tail"], summary["best_tail_x0"]
    return "\n".join([
        "# Toy tail-guidance study (tools/toy_study.py)", "",
        f"Command: `{summary['command']}`", "",
        f"{s['num_samples']} samples per config (labels i mod 3), DDPM {s['steps']} steps, shared noise bank "
        f"(seed {s['seed']}), x0_hat not clipped; denoiser `{s['denoiser']}` (null label {s['null_label']}), "
        f"classifier `{s['classifier']}`. Reference: {s['num_samples']} held-out real points "
        f"({s['rare_reals']} in rare modes). Truth: rareA 7 %, rareB 3 % (expected after the 3-sigma cut: "
        f"{100 * e['rareA']:.2f} / {100 * e['rareB']:.2f} %, off {100 * e['off']:.2f} %). "
        f"Wall time {summary['wall_seconds']} s.", "",
        f"Selection rule (fixed before the run): highest C rare subject to P >= P(uncond) - {rule['dP']}, "
        f"off <= off(uncond) + {100 * rule['dOff']:.0f} pp, Bayes acc >= acc(uncond) - {rule['dAcc']}; "
        f"C rare within {rule['tie']} = tie, broken by lower cFD.", "",
        f"* best tail (a)-(e): **{bt['name']}** (feasible: {bt['feasible']})",
        f"* best tail + x0 pull: **{bc['name']}** (feasible: {bc['feasible']})", "",
        table(summary), "",
    ])


def _scatter(ax, x: np.ndarray, labels: np.ndarray, title: str, max_points: int = 4000) -> None:
    import matplotlib.pyplot as plt

    keep = np.random.default_rng(0).permutation(len(x))[:max_points]
    xw, lab = x[keep] * toy.SCALE, labels[keep]
    colors = ("tab:blue", "tab:orange", "tab:green")
    for c in range(toy.NUM_CLASSES):
        ax.scatter(xw[lab == c, 0], xw[lab == c, 1], s=1.5, alpha=0.4, color=colors[c])
    for j in range(toy.CENTRES_WORLD.shape[0]):
        cx, cy = toy.CENTRES_WORLD[j].tolist()
        ax.add_patch(plt.Circle((cx, cy), toy.OFF_RADIUS * toy.SIGMAS_WORLD[j].item(), fill=False, lw=0.7,
                                color=colors[int(toy.MODE_CLASS[j])], ls="-" if toy.MODE_KIND[j] == 0 else "--"))
    sh = toy.mode_shares(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(labels))
    ax.set_title(f"{title}\nA {100 * sh['rareA']:.1f}% (7) B {100 * sh['rareB']:.2f}% (3) "
                 f"off {100 * sh['off']:.2f}%", fontsize=8)
    ax.set_aspect("equal")
    ax.set_xlim(-7.5, 7.5)
    ax.set_ylim(-7.5, 7.5)
    ax.tick_params(labelsize=6)


def scatter_panels(summary: dict, samples: dict, labels: np.ndarray, path: Path) -> list[str]:
    """Up to 6 panels: uncond, ADM-G s=2, best tail, best tail+x0, plain (a), lowest-C-rare config."""
    import matplotlib.pyplot as plt

    cfgs = summary["configs"]
    guided = [c for c in cfgs if cfgs[c]["family"] not in ("real (2nd draw)", "base")]
    worst = min(guided, key=lambda c: cfgs[c]["metrics"]["C_rare"]) if guided else None
    picks = [("uncond", "unguided"), ("admg_s2", "ADM-G s=2"), (summary["best_tail"]["name"], "best tail"),
             (summary["best_tail_x0"]["name"], "best tail+x0"), ("a_comp_s1_l1", "failure: plain (a)"),
             (worst, "lowest C rare")]
    seen, panels = set(), []
    for name, role in picks:
        if name in samples and name not in seen:
            seen.add(name)
            panels.append((name, role))
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, role) in zip(axes.flat, panels):
        _scatter(ax, samples[name], labels, f"{role}: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [p[0] for p in panels]


def tradeoff(summary: dict, xkey: str, ykey: str, path: Path, xlabel: str, ylabel: str, log: bool = True) -> None:
    """Scatter ``ykey`` vs ``xkey`` over configs (colour = family), annotated, full range and a zoom."""
    import matplotlib.pyplot as plt

    cfgs = summary["configs"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    base = cfgs.get("uncond", {}).get("metrics")
    for k, ax in enumerate(axes):
        for name, r in cfgs.items():
            m = r["metrics"]
            xv, yv = max(m[xkey], 1e-5), m[ykey]
            if k == 1 and base is not None and (yv < base[ykey] - 0.1 or xv > 50 * max(base[xkey], 1e-3)):
                continue
            ax.scatter(xv, yv, color=FAMILY_COLORS.get(r["family"].replace("tail+", ""), "k"),
                       marker="*" if r["family"].startswith("tail+") else "o", s=30)
            ax.annotate(name, (xv, yv), fontsize=5, alpha=0.8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(("all configs" if k == 0 else "zoom near unguided") + " (* = tail+x0)", fontsize=9)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f) for f, c in FAMILY_COLORS.items()]
    axes[0].legend(handles=handles, fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rare_shares(summary: dict, path: Path) -> None:
    """Bar chart of rareA / rareB / off per config with the true shares dashed."""
    import matplotlib.pyplot as plt

    cfgs = summary["configs"]
    names = list(cfgs)
    idx = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(10, 0.32 * len(names)), 4.5))
    for j, (key, color) in enumerate((("rareA", "tab:blue"), ("rareB", "tab:red"), ("off", "tab:gray"))):
        ax.bar(idx + (j - 1) * 0.28, [100 * cfgs[n]["metrics"][key] for n in names], 0.28, color=color, label=key)
    for v, c in ((7, "tab:blue"), (3, "tab:red")):
        ax.axhline(v, ls="--", color=c, lw=0.8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xticks(idx)
    ax.set_xticklabels(names, rotation=80, fontsize=6)
    ax.set_ylabel("% of samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summary: dict, samples: dict, labels: torch.Tensor, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    (out / "results.md").write_text(markdown(summary))
    scatter_panels(summary, samples, np.asarray(labels), out / "scatter.png")
    tradeoff(summary, "FD", "R", out / "recall_vs_fd.png", "pooled FD (log)", "pooled recall R (k=3)")
    tradeoff(summary, "cFD", "C_rare", out / "crare_vs_cfd.png", "class-conditional FD (log)",
             "coverage of rare-mode reals (k=5)")
    rare_shares(summary, out / "rare_shares.png")
