"""Fashion-MNIST tail study v2 (docs/tail_study/PROTOCOL.md): one command, resumable, per-unit results.

    python tools/tail_study.py run    [--plan configs/study/fashion_tail.yaml] [--out runs/tail_study]
                                      [--stage grid|headline] [--only RUN ...] [--wandb] [--dry-run]
                                      [--deadline HH:MM|+Nm|DATE]  # or `touch runs/tail_study/STOP`
    python tools/tail_study.py list   [--plan ...]                      # the expanded runs and their flags
    python tools/tail_study.py report [--plan ...]   # <docs>/model_<sha>/: tables, verdicts, plots; README's table

The same runner serves other plans (``--plan configs/study/fashion_steps.yaml``: quality per network call, issue
11). A plan may name its own ``paths`` (out / records / docs, relative to the repository; flags override), its
``report.module`` (a module in ``tools/`` with ``report(plan, records, docs)``), ``extends`` (another plan, relative
to this one's folder, that this one overrides key by key: e.g. the same study on another base model), ``order:
cost`` (grid units by network calls, unguided first), ``first`` (runs the grid starts with) and
``setting.wandb_project``; ``setting.steps`` is then optional. A method may carry ``steps`` (its runs' respacing
instead of ``setting.steps``), ``knob: steps`` (its ``values`` are step counts; its guidances, if any, stay as
written) and ``model`` arguments such as ``sampler`` / ``eta`` / ``autocast``. A plan's ``record_args`` names the
``model.init_args`` each record states (under ``sampling``, as the run sets them: sampler, precision); the tail plan
names none, so its records are as before.

A *unit* is (run, N, seed set): ``tailgen predict`` writes ``<out>/model_<sha>/<run>/n<N>_s<seed>/samples.npz``
(+ grid; ``model_<sha>`` = the first digits of the diffusion weights' sha256, so results of different models never
mix), then ``tailgen test`` on those samples writes ``metrics.json`` beside them. ``<out>`` is scratch (samples,
logs; not in git). The finished unit's *record* -- what was run, on which model, how long, and every metric -- is
written last, atomically, to ``<records>/model_<sha>/<run>/n<N>_s<seed>.json`` (default
``docs/tail_study/units``, committed), so the study resumes across sessions and machines: a unit with a record is
skipped. Every unit can be reproduced by hand from the command saved in its ``command.txt``. Several study processes
may run at once (e.g. one per core): each unit is claimed by a ``lock`` file holding the claiming pid. The model's
weights digest is recorded per unit (``unit.json``) so every number names the model it comes from.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATHS = {"out": "runs/tail_study", "records": "docs/tail_study/units", "docs": "docs/tail_study"}


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _set_knob(guidances: dict, knob: str, value) -> dict:
    name, arg = knob.split(".", 1)
    out = copy.deepcopy(guidances)
    out[name].setdefault("init_args", {})[arg] = value
    return out


def expand(plan: dict) -> dict[str, dict]:
    """The plan's runs: ``{name: {"method", "value", "adm_g", "guidances", "model", "steps"}}`` in plan order.
    ``steps``: the method's ``steps``, else ``setting.steps``; with ``knob: steps`` the value itself (then the
    method's guidances, if any, are used as written)."""
    methods, curve = plan["methods"], plan.get("curve", "adm_g")
    default_steps = plan.get("setting", {}).get("steps")
    runs: dict[str, dict] = {}
    for method, spec in methods.items():
        if spec.get("with_adm_g") and curve not in methods:
            raise SystemExit(f"tail_study: method {method!r} has with_adm_g but the plan has no {curve!r} method")
        for value in spec["values"]:
            for cg_scale in [None, *spec.get("with_adm_g", [])]:
                steps = spec.get("steps", default_steps)
                if spec.get("knob") == "steps":
                    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                        raise SystemExit(f"tail_study: method {method!r}: steps must be counts >= 1, got {value!r}")
                    guidances, steps = copy.deepcopy(spec.get("guidances", {})), value
                elif method == curve and value == 0:
                    guidances = {}  # s = 0: unguided, no classifier work at all
                else:
                    guidances = _set_knob(spec["guidances"], spec["knob"], value)
                if steps is None:
                    raise SystemExit(f"tail_study: method {method!r} has no steps (set setting.steps or its own)")
                name = f"{method}@{_fmt(value)}"
                if cg_scale is not None:
                    cg = methods[curve]
                    guidances = {**_set_knob(cg["guidances"], cg["knob"], cg_scale), **guidances}
                    name += f"+{curve}@{_fmt(cg_scale)}"
                runs[name] = {"method": method, "value": value, "adm_g": cg_scale, "guidances": guidances,
                              "model": spec.get("model", {}), "steps": steps}
    return runs


def init_args(plan: dict, run: dict) -> dict:
    """The run's ``model.init_args`` overlay (``guidances.yaml``): the plan's ``setting.model``, the method's
    ``model``, the guidances."""
    return {**plan["setting"].get("model", {}), **run.get("model", {}), "guidances": run["guidances"]}


def recorded_args(plan: dict, args: dict) -> dict:
    """The record's ``sampling``: the init args named by the plan's ``record_args`` that the run's ``args`` set."""
    return {k: args[k] for k in plan.get("record_args", []) if k in args}


def network_calls(steps) -> int:
    """Sampler steps of a respacing (``"K"``, ``"ddimK"``, ``"a,b,c"`` or an int): the cost order of ``order: cost``
    (one UNet call per step for ddpm / ddim / dpmpp_2m)."""
    return sum(int(c) for c in str(steps).removeprefix("ddim").split(","))


def unit_dir(out: Path, run: str, n: int, seed: int) -> Path:
    """``<out>/<run>/n<N>_s<seed>``; ``out`` already names the model (see :func:`model_out`)."""
    return out / run.replace("@", "_").replace("+", "__") / f"n{n}_s{seed}"


def model_out(out: Path, model: dict) -> Path:
    """Results of different diffusion weights never mix: ``<out>/model_<sha256[:10]>``."""
    return out / f"model_{(model['weights_sha256'] or 'random')[:10]}"


def commands(plan: dict, run: dict, n: int, seed: int, folder: Path, wandb: bool) -> tuple[list[str], list[str]]:
    """The ``tailgen predict`` and ``tailgen test`` argument lists of one unit."""
    s = plan["setting"]
    steps = run.get("steps", s.get("steps"))
    overlay = folder / "guidances.yaml"
    common = ["--config", str(ROOT / s["base"]), "--config", str(overlay),
              f"--data.init_args.num_samples={n}", f"--data.init_args.seed={seed}",
              "--data.init_args.labels=balanced", f"--data.init_args.batch_size={s.get('batch_size', 250)}",
              f"--model.init_args.diffusion={{timestep_respacing: '{steps}'}}",
              "--model.init_args.progress=false", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={folder}"]
    predict = ["predict", *common, f"--writer.output_dir={folder}"]
    evals = [a for e in s["eval"] for a in ("--config", str(ROOT / e))]
    test = ["test", *common[:2], *evals, *common[2:], f"--data.init_args.samples={folder / 'samples.npz'}",
            f"--model.init_args.evaluation.init_args.output={folder / 'metrics.json'}",
            f"--model.init_args.evaluation.init_args.max_reference={n}"]
    if wandb:
        test += ["--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline=true",
                 f"--trainer.logger.project={s.get('wandb_project', 'tailgen-tail-study')}",
                 f"--trainer.logger.save_dir={folder}",
                 f"--trainer.logger.name={folder.parent.name}/{folder.name}"]
    return predict, test


def model_digest(plan: dict) -> dict:
    """Which diffusion model the numbers come from: the base config's network (as the CLI resolves it, includes
    and all) and its weights' sha256."""
    from tailgen.models.spec import NetworkSpec
    from tailgen.utils.io import file_digest

    printed = subprocess.run([sys.executable, "-m", "tailgen.cli", "predict", "--config",
                              str(ROOT / plan["setting"]["base"]), "--print_config"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
    network = yaml.safe_load(printed)["model"]["init_args"]["network"]
    network = network.get("init_args", network)  # class_path + init_args, or the plain mapping
    spec = NetworkSpec(**network)
    path = spec.checkpoint or (spec._preset or {}).get("weights")
    return {"network": network, "weights_sha256": file_digest(path) if path else None}


def study_folders(plan: dict, out: str | None = None, records: str | None = None,
                  docs: str | None = None) -> dict[str, Path]:
    """``{"out", "records", "docs"}`` of the plan's model: :func:`paths`, each under ``model_<sha256[:10]>``. Sets
    ``plan["_model"]`` (:func:`model_digest`) if it is not set yet."""
    if "_model" not in plan:
        plan["_model"] = model_digest(plan)
    return {key: model_out(Path(path), plan["_model"]) for key, path in paths(plan, out, records, docs).items()}


def record_path(records: Path, run: str, n: int, seed: int) -> Path:
    """``<records>/<run>/n<N>_s<seed>.json``; ``records`` already names the model (see :func:`model_out`)."""
    return unit_dir(records, run, n, seed).with_suffix(".json")


def run_unit(plan: dict, name: str, run: dict, n: int, seed: int, out: Path, records: Path, wandb: bool,
             dry: bool) -> bool:
    folder = unit_dir(out, name, n, seed)
    if record_path(records, name, n, seed).exists():
        return False
    predict, test = commands(plan, run, n, seed, folder, wandb)
    text = "\n".join(shlex.join(["tailgen", *c]) for c in (predict, test))
    if dry:
        print(f"# {name} n={n} seed={seed}\n{text}")
        return True
    folder.mkdir(parents=True, exist_ok=True)
    if not claim(folder):
        print(f"skip {name} n={n} seed={seed}: another study process is running it", flush=True)
        return False
    try:
        return _run_claimed(plan, name, run, n, seed, folder, predict, test, text, record_path(records, name, n, seed))
    finally:
        (folder / "lock").unlink(missing_ok=True)


def claim(folder: Path) -> bool:
    """Take the unit for this process (``lock`` holds its pid), so several study processes can share the work; a
    lock whose process is gone is taken over."""
    lock = folder / "lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False  # alive
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # stale
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def _run_claimed(plan, name, run, n, seed, folder, predict, test, text, record: Path) -> bool:
    tailgen = [sys.executable, "-m", "tailgen.cli"]
    args = init_args(plan, run)
    (folder / "guidances.yaml").write_text(yaml.safe_dump({"model": {"init_args": args}}))
    (folder / "command.txt").write_text(text + "\n")
    start = time.perf_counter()
    for stage, argv in (("predict", predict), ("test", test)):
        if stage == "predict" and (folder / "samples.json").exists():  # written last by a finished predict
            continue
        with open(folder / f"{stage}.log", "w") as log:
            rc = subprocess.call([*tailgen, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if rc != 0:
            tail = (folder / f"{stage}.log").read_text().strip().splitlines()[-3:]
            print(f"FAILED {name} n={n} seed={seed} at {stage} (exit {rc}): {' | '.join(tail)}", flush=True)
            return True
    info = {"run": name, **{k: run[k] for k in ("method", "value", "adm_g")}, "num_samples": n, "seed": seed,
            **({"model_args": run["model"]} if run.get("model") else {}),
            "steps": run.get("steps", plan["setting"].get("steps")),
            **({"sampling": sampling} if (sampling := recorded_args(plan, args)) else {}),
            "seconds": round(time.perf_counter() - start, 1),
            "model": plan["_model"], "guidances": run["guidances"]}
    (folder / "unit.json").write_text(json.dumps(info, indent=1) + "\n")
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_suffix(".partial")
    metrics = json.loads((folder / "metrics.json").read_text())
    partial.write_text(json.dumps({**info, "metrics": metrics}, indent=1, sort_keys=False) + "\n")
    partial.replace(record)  # atomic: a record exists only for a finished unit
    print(f"done {name} n={n} seed={seed} in {info['seconds']:.0f} s", flush=True)
    return True


def paths(plan: dict, out: str | None = None, records: str | None = None, docs: str | None = None) -> dict[str, str]:
    """``{"out", "records", "docs"}`` as absolute paths: the flag (relative to the current directory), else the plan's
    ``paths`` entry (relative to the repository), else the tail study's default. Absolute, because the units'
    ``tailgen`` commands run from the repository root, and ``tailgen test`` puts a relative metrics path under its
    logger's folder."""
    given = {"out": out, "records": records, "docs": docs}
    return {k: str(Path(given[k]).resolve()) if given[k] else str(ROOT / plan.get("paths", {}).get(k, default))
            for k, default in DEFAULT_PATHS.items()}


def _merged(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_plan(path: Path) -> dict:
    """The plan at ``path``; ``extends: OTHER.yaml`` (relative to the plan's folder) puts it on top of that plan."""
    plan = yaml.safe_load(path.read_text()) or {}
    parent = plan.pop("extends", None)
    return _merged(read_plan(path.parent / parent), plan) if parent else plan


def load_plan(path: str) -> dict:
    plan = read_plan(Path(path))
    plan["_runs"] = expand(plan)
    return plan


def interleaved(runs: dict[str, dict]) -> list[str]:
    """Grid order: round-robin over methods, each method's runs on top of ADM-G first and middle strengths before
    the extremes, so that an interrupted study has seen every method early rather than a few at every strength."""
    per_method: dict[str, list[str]] = {}
    for name, run in runs.items():
        per_method.setdefault(run["method"], []).append(name)
    def key(r: str) -> tuple:  # on ADM-G first, then middle strengths before the extremes
        values = sorted({runs[o]["value"] for o in per_method[runs[r]["method"]]})
        return runs[r]["adm_g"] is None, abs(values.index(runs[r]["value"]) - (len(values) - 1) / 2)

    queues = [sorted(names, key=key) for names in per_method.values()]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def units(plan: dict, stage: str, only: list[str] | None) -> list[tuple[str, int, int]]:
    s = plan["setting"]
    names = list(plan.get("headline", []))
    if stage == "grid":
        runs = plan["_runs"]
        order = plan.get("order", "interleaved")
        if order not in ("interleaved", "cost"):
            raise SystemExit(f"tail_study: plan order must be interleaved or cost, got {order!r}")
        names = interleaved(runs) if order == "interleaved" else sorted(  # cheap first, unguided before guided
            runs, key=lambda r: (network_calls(runs[r]["steps"]), bool(runs[r]["guidances"])))
        first = plan.get("first", [])  # e.g. the reference rows, so that an interrupted study can compare
        names = [*first, *[r for r in names if r not in first]]
    unknown = [r for r in (only or []) + plan.get("first", []) if r not in plan["_runs"]]
    if unknown:
        raise SystemExit(f"tail_study: unknown run(s) {unknown}; see `python tools/tail_study.py list`")
    names = [r for r in names if not only or r in only]
    if stage not in s:
        raise SystemExit(f"tail_study: the plan has no {stage} stage (setting.{stage}: num_samples, seeds)")
    n, seeds = s[stage]["num_samples"], s[stage]["seeds"]
    return [(r, n, seed) for r in names for seed in seeds]  # a row's seed sets together: its noise comes first


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["run", "list", "report"])
    ap.add_argument("--plan", default=str(ROOT / "configs/study/fashion_tail.yaml"))
    ap.add_argument("--out", help="scratch: samples, logs (default: the plan's paths.out, else runs/tail_study)")
    ap.add_argument("--records", help="where finished units' records (metrics + provenance) go; committed, so the "
                    "study resumes (default: the plan's paths.records, else docs/tail_study/units)")
    ap.add_argument("--docs", help="report output (default: the plan's paths.docs, else docs/tail_study)")
    ap.add_argument("--stage", choices=["grid", "headline"], default="grid")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--wandb", action="store_true", help="log every test run to W&B (offline)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--deadline", help="HH:MM: start no unit after the next such local time, midnight crossed if "
                    "needed; +Nm / +Nh from now; or a local date and time YYYY-MM-DDTHH:MM, which never moves to "
                    "tomorrow (for chained scripts); a running unit finishes; the resolved time is printed")
    args = ap.parse_args(argv)
    deadline = parse_deadline(args.deadline) if args.deadline else None
    plan = load_plan(args.plan)
    args.out, args.records, args.docs = paths(plan, args.out, args.records, args.docs).values()
    if args.action == "list":
        for name, run in plan["_runs"].items():
            model = f"  model: {json.dumps(run['model'])}" if run.get("model") else ""
            steps = f"  steps: {run['steps']}" if run["steps"] != plan["setting"].get("steps") else ""
            print(f"{name:40s} {json.dumps(run['guidances'])}{model}{steps}")
        return
    folders = study_folders(plan, args.out, args.records, args.docs)
    if args.action == "report":
        sys.path.insert(0, str(Path(__file__).parent))
        module = plan.get("report", {}).get("module", "tail_study_report")
        if module == "tail_study_report":
            from tail_study_report import report

            report(plan, folders["records"], folders["docs"], folders["out"], ROOT / "README.md")
        else:
            importlib.import_module(module).report(plan, folders["records"], Path(args.docs))
        return
    from tqdm import tqdm

    todo = units(plan, args.stage, args.only)
    if deadline is not None and not args.dry_run:
        print(f"tail_study: no unit starts after {time.strftime('%a %d %b %H:%M', time.localtime(deadline))}",
              flush=True)
    for name, n, seed in tqdm(todo, desc=f"tail study ({args.stage})", disable=args.dry_run):
        if not args.dry_run and (reason := should_stop(Path(args.out), deadline)):
            print(f"tail_study: stopping before {name} n={n} seed={seed}: {reason}", flush=True)
            break
        run_unit(plan, name, plan["_runs"][name], n, seed, folders["out"], folders["records"], args.wandb,
                 args.dry_run)


def parse_deadline(text: str, now: float | None = None) -> float:
    """``HH:MM`` -> the epoch time of its next occurrence after ``now`` (local time; "00:40" at 22:10 is tomorrow's);
    ``+90m`` / ``+2h`` -> ``now`` plus that duration; ``2026-12-02T22:20`` -> that local time, even when it has
    passed (a script that chains several study commands computes one deadline and passes it to each)."""
    import datetime as dt

    now = time.time() if now is None else now
    text = text.strip()
    if duration := re.fullmatch(r"\+(\d+(?:\.\d+)?)([mh])", text):
        return now + float(duration[1]) * (60 if duration[2] == "m" else 3600)
    if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text):
        try:
            return dt.datetime.fromisoformat(text).timestamp()
        except ValueError:
            pass  # e.g. month 13: the error below
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", text)
    if not match:
        raise SystemExit(f"tail_study: --deadline {text!r} is neither a time HH:MM (00:00-23:59), a duration +Nm / "
                         "+Nh nor a date and time YYYY-MM-DDTHH:MM; e.g. --deadline 00:40, +90m or 2026-12-02T22:20")
    start = dt.datetime.fromtimestamp(now)
    at = start.replace(hour=int(match[1]), minute=int(match[2]), second=0, microsecond=0)
    if at <= start:
        at += dt.timedelta(days=1)
    return at.timestamp()


def should_stop(out: Path, deadline: float | None) -> str | None:
    """Why no new unit should start: a ``STOP`` file in ``out`` (``touch runs/tail_study/STOP`` ends every study
    process at its next unit boundary, losing nothing) or the ``deadline`` (epoch seconds, from ``parse_deadline``)
    has passed."""
    if (out / "STOP").exists():
        return f"{out / 'STOP'} exists"
    if deadline is not None and time.time() >= deadline:
        return f"deadline {time.strftime('%H:%M', time.localtime(deadline))} reached"
    return None

if __name__ == "__main__":
    main()
