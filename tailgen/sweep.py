"""``tailgen sweep``: run a W&B sweep file locally, without a sweep server.

    tailgen sweep configs/sweeps/fashion_tail.yaml [--out outputs/sweeps/fashion_tail] [--count 20] [--wandb offline]

The file is the one ``wandb sweep`` takes (https://docs.wandb.ai/guides/sweeps/define-sweep-configuration):
``method`` grid or random, ``parameters`` with ``values`` / ``value`` / a ``distribution`` (W&B's names and
inference rules), ``command`` (``${env}``, ``${interpreter}``, ``${program}``, ``${args}``, ``${args_no_hyphens}``),
``metric`` (plotted first), ``run_cap``. Each trial runs as its own process in ``<out>/<trial>/`` (its parameters
in ``params.json``, its output in ``log.txt``); a trial whose ``metrics.json`` (``samples.npz`` for predict) exists
is skipped, so a cut-off sweep resumes where it stopped. For ``tailgen test`` trials the runner points the metrics
file, the trainer's root dir and a W&B logger (offline by default: ``WANDB_MODE``) at the trial folder and names the
W&B run after the trial. At the end it writes ``results.json`` / ``results.csv`` and one plot per swept parameter
(``plot_<param>.png``: each metric against the parameter, one line per setting of the other parameters, mean and
standard deviation over parameters named ``...seed``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from tailgen.utils import ConfigError
from tailgen.utils.io import atomic_write

DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values",
                 "q_log_uniform_values", "normal", "q_normal", "log_normal")
DEFAULT_PLOT_METRICS = ("fid", "precision", "recall", "coverage")
MAX_LINES = 8  # more settings of the other parameters than this: plot a point cloud instead of one line each


# ------------------------------------------------------------------------------------------------ expansion


def load_sweep(path: str | Path) -> dict:
    sweep = yaml.safe_load(Path(path).read_text())
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict) or not sweep["parameters"]:
        raise ConfigError(f"{path}: a sweep file needs a 'parameters' mapping (W&B sweep format)")
    if sweep.get("method", "grid") not in ("grid", "random"):
        raise ConfigError(f"{path}: method {sweep['method']!r} needs the W&B server; the local runner does grid and random")
    return sweep


def _distribution(name: str, spec: dict) -> str:
    """W&B's rule: explicit ``distribution``, else values -> categorical, value -> constant, int min/max ->
    int_uniform, other min/max -> uniform."""
    if "distribution" in spec:
        if spec["distribution"] not in DISTRIBUTIONS:
            raise ConfigError(f"parameter {name}: distribution {spec['distribution']!r} is not supported locally; "
                              f"use one of {', '.join(DISTRIBUTIONS)}")
        return spec["distribution"]
    if "values" in spec:
        return "categorical"
    if "value" in spec:
        return "constant"
    if "min" in spec and "max" in spec:
        return "int_uniform" if all(isinstance(spec[k], int) for k in ("min", "max")) else "uniform"
    raise ConfigError(f"parameter {name}: give values, value, or min/max (or a distribution)")


def draw(name: str, spec: dict, rng: random.Random) -> Any:
    """One random value of a W&B parameter specification."""
    kind = _distribution(name, spec)
    lo, hi, q = spec.get("min"), spec.get("max"), spec.get("q", 1)
    if kind == "constant":
        return spec["value"]
    if kind == "categorical":
        return rng.choice(spec["values"])
    if kind == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if kind in ("uniform", "q_uniform"):
        x = rng.uniform(lo, hi)
        return x if kind == "uniform" else round(x / q) * q
    if kind == "log_uniform":  # min/max are natural logs
        return math.exp(rng.uniform(lo, hi))
    if kind in ("log_uniform_values", "q_log_uniform_values"):
        x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return x if kind == "log_uniform_values" else round(x / q) * q
    mu, sigma = spec.get("mu", 0.0), spec.get("sigma", 1.0)
    if kind == "normal":
        return rng.gauss(mu, sigma)
    if kind == "q_normal":
        return round(rng.gauss(mu, sigma) / q) * q
    return math.exp(rng.gauss(mu, sigma))  # log_normal


def expand(sweep: dict, count: Optional[int] = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials' parameter dicts: the grid's cartesian product (in file order), or ``count`` random draws
    (default ``run_cap``) from a generator seeded with ``seed`` (so a rerun draws the same trials)."""
    params = sweep["parameters"]
    if sweep.get("method", "grid") == "grid":
        axes = []
        for name, spec in params.items():
            kind = _distribution(name, spec)
            if kind not in ("categorical", "constant"):
                raise ConfigError(f"parameter {name}: grid search needs values or value, not a {kind} distribution "
                                  "(or use method: random)")
            axes.append(spec["values"] if kind == "categorical" else [spec["value"]])
        trials = [dict(zip(params, combo)) for combo in itertools.product(*axes)]
        return trials[:count] if count else trials
    count = count or sweep.get("run_cap")
    if not count:
        raise ConfigError("a random sweep needs a trial count: --count N or run_cap in the sweep file")
    rng = random.Random(seed)
    return [{name: draw(name, spec, rng) for name, spec in params.items()} for _ in range(count)]


# ------------------------------------------------------------------------------------------------ one trial


def short_name(key: str) -> str:
    """``model.init_args.guidances.tail.init_args.scale`` -> ``tail.scale``."""
    parts = [p for p in key.split(".") if p not in ("init_args", "model", "guidances")]
    return ".".join(parts[-2:]) if len(parts) > 1 else (parts[0] if parts else key)


def format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def trial_name(params: dict[str, Any]) -> str:
    """A readable folder name that depends only on the parameter values (so resuming finds it again)."""
    def short(v: Any) -> str:  # random draws: 4 significant digits in the name (the digest keeps them apart)
        return f"{v:.4g}" if isinstance(v, float) and len(str(v)) > 8 else format_value(v)

    slug = "_".join(f"{short_name(k)}={short(v)}" for k, v in params.items())
    slug = re.sub(r"[^A-Za-z0-9._=+-]", "", slug)[:80]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{slug}-{digest}"


def build_command(sweep: dict, params: dict[str, Any]) -> list[str]:
    """The trial's argv from the sweep's ``command`` (W&B's macros); ``tailgen`` runs as this interpreter's module."""
    program = sweep.get("program", "tailgen")
    command = sweep.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    args = [f"--{k}={format_value(v)}" for k, v in params.items()]
    argv: list[str] = []
    for word in command:
        if word == "${env}":
            continue
        if word == "${interpreter}":
            if program.endswith(".py"):
                argv.append(sys.executable)
        elif word == "${program}":
            argv.append(program)
        elif word == "${args}":
            argv += args
        elif word == "${args_no_hyphens}":
            argv += [a[2:] for a in args]
        else:
            argv.append(word)
    if argv and argv[0] == "tailgen":
        argv = [sys.executable, "-m", "tailgen.cli", *argv[1:]]
    return argv


def _subcommand(argv: list[str]) -> Optional[str]:
    if argv[1:3] == ["-m", "tailgen.cli"]:
        return next((a for a in argv[3:] if not a.startswith("-")), None)
    return None


def done_marker(argv: list[str], folder: Path) -> Path:
    return folder / ("samples.npz" if _subcommand(argv) == "predict" else "metrics.json")


def trial_flags(argv: list[str], folder: Path, run_name: str) -> list[str]:
    """Flags that put a tailgen trial's outputs into its folder (appended last, so they win)."""
    sub = _subcommand(argv)
    flags = [f"--trainer.default_root_dir={folder}"] if sub in ("test", "predict", "fit") else []
    if sub == "test":
        flags.append(f"--model.init_args.evaluation.init_args.output={folder / 'metrics.json'}")
    if sub == "predict":
        flags.append(f"--writer.output_dir={folder}")
    if sub and any("WandbLogger" in a for a in argv):
        flags += [f"--trainer.logger.init_args.save_dir={folder}", f"--trainer.logger.init_args.name={run_name}"]
    return flags


def run_trial(sweep: dict, params: dict[str, Any], folder: Path, *, sweep_name: str, wandb_mode: str) -> dict:
    """Run one trial (unless its done-marker exists); returns its record for results.json."""
    argv = build_command(sweep, params)
    marker = done_marker(argv, folder)
    record: dict[str, Any] = {"trial": folder.name, "params": params, "folder": str(folder)}
    if marker.exists():
        return {**record, "status": "done", "skipped": True, **_metrics(folder)}
    folder.mkdir(parents=True, exist_ok=True)
    argv = argv + trial_flags(argv, folder, f"{sweep_name}-{folder.name}")
    atomic_write(folder / "params.json", lambda tmp: tmp.write_text(json.dumps({"params": params, "argv": argv}, indent=2)))
    env = {**os.environ, "WANDB_MODE": wandb_mode, "WANDB_DIR": str(folder), "WANDB_SILENT": "true",
           "TAILGEN_TRIAL_DIR": str(folder)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    with open(folder / "log.txt", "w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not marker.exists():
        return {**record, "status": f"failed (exit {code}, see {folder / 'log.txt'})", "skipped": False}
    return {**record, "status": "done", "skipped": False, **_metrics(folder)}


def _metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    return {"metrics": json.loads(path.read_text())} if path.exists() else {}


# ------------------------------------------------------------------------------------------------ results


def write_results(records: list[dict], out: Path) -> None:
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(records, indent=2, default=str)))
    params = list(dict.fromkeys(k for r in records for k in r["params"]))
    metrics = list(dict.fromkeys(k for r in records for k in r.get("metrics", {}) if not k.startswith("class/")))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["trial", "status", *params, *metrics])
            for r in records:
                w.writerow([r["trial"], r["status"], *(r["params"].get(p) for p in params),
                            *(r.get("metrics", {}).get(m) for m in metrics)])

    atomic_write(out / "results.csv", write)


def is_replicate(key: str) -> bool:
    """Parameters that repeat a setting (seeds): averaged over, drawn as error bars."""
    return key.rsplit(".", 1)[-1] in ("seed", "seed_everything")


def aggregate(records: list[dict], key: str, metric: str,
              others: Optional[list[str]] = None) -> dict[tuple, list[tuple[Any, float, float, int]]]:
    """Curves of ``metric`` against parameter ``key``: for each setting of the ``others`` (default: the other swept,
    non-seed parameters), [(x, mean, std, n)] sorted by x, mean and sample std (ddof 1; 0 for one run) over the
    trials that share x and that setting (the replicates: seeds)."""
    import numpy as np

    done = [r for r in records if r.get("metrics") and r["metrics"].get(metric) is not None]
    others = [k for k in swept_parameters(records) if k != key] if others is None else others
    curves: dict[tuple, dict[Any, list[float]]] = {}
    for r in done:
        group = tuple(format_value(r["params"][k]) for k in others)
        curves.setdefault(group, {}).setdefault(r["params"][key], []).append(float(r["metrics"][metric]))
    return {group: [(x, float(np.mean(ys)), float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0, len(ys))
                    for x, ys in sorted(points.items(), key=lambda item: _sort_key(format_value(item[0])))]
            for group, points in sorted(curves.items(), key=lambda item: [_sort_key(v) for v in item[0]])}


def swept_parameters(records: list[dict]) -> list[str]:
    """Parameters that take more than one value among finished trials, seeds excluded."""
    done = [r for r in records if r.get("metrics")]
    keys = list(dict.fromkeys(k for r in done for k in r["params"]))
    return [k for k in keys if not is_replicate(k) and len({format_value(r["params"].get(k)) for r in done}) > 1]


def plot_results(records: list[dict], out: Path, metrics: list[str]) -> list[Path]:
    """One figure per swept parameter: each metric against it, one line per setting of the other swept
    parameters, error bars = std over replicate (seed) parameters. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.get("metrics")]
    metrics = [m for m in metrics if any(r["metrics"].get(m) is not None for r in done)]
    replicated = any(is_replicate(k) for r in done for k in r["params"])
    paths = []
    for key in swept_parameters(records) if metrics else []:
        others = [k for k in swept_parameters(records) if k != key]
        settings = {tuple(format_value(r["params"][k]) for k in others) for r in done}
        scatter = len(settings) > MAX_LINES  # e.g. a random sweep: every trial its own setting -> one point cloud
        others = [] if scatter else others
        values = sorted({format_value(r["params"][key]) for r in done}, key=_sort_key)
        numeric = all(isinstance(r["params"][key], (int, float)) for r in done)
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for group, curve in aggregate(records, key, metric, others).items():
                xs = [float(x) if numeric else values.index(format_value(x)) for x, *_ in curve]
                stds = [std for _, _, std, _ in curve]
                label = ", ".join(f"{short_name(k)}={v}" for k, v in zip(others, group)) or None
                ax.errorbar(xs, [mean for _, mean, _, _ in curve], yerr=stds if any(stds) else None, marker="o",
                            capsize=3, label=label, linestyle="none" if scatter else "-")
            ax.set_xlabel(short_name(key))
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if not numeric:
                ax.set_xticks(range(len(values)), values, rotation=30)
        if others:
            axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(f"{out.name}: metrics vs {short_name(key)}" + (" (mean ± std over seeds)" if replicated else ""))
        fig.tight_layout()
        path = out / f"plot_{re.sub(r'[^A-Za-z0-9_.=-]', '', short_name(key))}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths


def _sort_key(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


# ------------------------------------------------------------------------------------------------ entry point


def run_sweep(path: str | Path, out: Optional[str | Path] = None, *, count: Optional[int] = None, seed: int = 0,
              wandb_mode: str = "offline", plot_metrics: Optional[list[str]] = None, dry_run: bool = False) -> list[dict]:
    sweep = load_sweep(path)
    name = Path(path).stem
    out = Path(out or Path("outputs/sweeps") / name).resolve()
    trials = expand(sweep, count=count, seed=seed)
    if dry_run:
        for params in trials:
            print(trial_name(params), " ".join(build_command(sweep, params)))
        return []
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for k, params in enumerate(trials, 1):
        folder = out / trial_name(params)
        print(f"[{k}/{len(trials)}] {folder.name} ...", end=" ", flush=True)
        record = run_trial(sweep, params, folder, sweep_name=name, wandb_mode=wandb_mode)
        print("done (kept)" if record.get("skipped") else record["status"], flush=True)
        records.append(record)
        write_results(records, out)  # after every trial: a cut-off sweep keeps its table
    goal = (sweep.get("metric") or {}).get("name")
    metrics = list(dict.fromkeys([*([goal] if goal else []), *(plot_metrics or DEFAULT_PLOT_METRICS)]))
    plots = plot_results(records, out, metrics)
    ran = sum(not r.get("skipped") for r in records)
    failed = [r for r in records if r["status"] != "done"]
    print(f"{len(records)} trials ({ran} run, {len(records) - ran} kept, {len(failed)} failed); results in "
          f"{out / 'results.json'}" + "".join(f"\nplot: {p}" for p in plots))
    return records


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="tailgen sweep", description="Run a W&B sweep file locally (grid / random), "
                                 "resumably, one folder per trial, with metric-vs-parameter plots.")
    ap.add_argument("sweep", help="a W&B sweep YAML, e.g. configs/sweeps/fashion_tail.yaml")
    ap.add_argument("--out", help="sweep folder (default: outputs/sweeps/<sweep file name>)")
    ap.add_argument("--count", type=int, help="trials of a random sweep (default: run_cap); first N of a grid")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random draws (same seed, same trials)")
    ap.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"],
                    help="WANDB_MODE for trials whose command logs to W&B (offline: `wandb sync <trial>/wandb/...` later)")
    ap.add_argument("--plot-metrics", nargs="+", help=f"metrics to plot (default: the sweep's metric + {', '.join(DEFAULT_PLOT_METRICS)})")
    ap.add_argument("--dry-run", action="store_true", help="list the trials and their commands, run nothing")
    args = ap.parse_args(argv)
    try:
        records = run_sweep(args.sweep, args.out, count=args.count, seed=args.seed, wandb_mode=args.wandb,
                            plot_metrics=args.plot_metrics, dry_run=args.dry_run)
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"tailgen sweep: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if any(r["status"] != "done" for r in records):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
