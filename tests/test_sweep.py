"""`tailgen sweep`: W&B sweep files expanded locally (grid, random with W&B's distributions, the command's macros),
run one folder per trial, resumed (finished trials are kept), tabulated and plotted (mean +- std over seeds)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from tailgen.cli import main as tailgen
from tailgen.sweep import aggregate, build_command, expand, plot_results, run_sweep, short_name, trial_name
from tailgen.utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_grid_is_the_product_in_file_order():
    sweep = {"method": "grid", "parameters": {"a": {"values": [1, 2]}, "b": {"value": "x"}, "c": {"values": [0.5, 1.5]}}}
    assert expand(sweep) == [{"a": 1, "b": "x", "c": 0.5}, {"a": 1, "b": "x", "c": 1.5},
                             {"a": 2, "b": "x", "c": 0.5}, {"a": 2, "b": "x", "c": 1.5}]
    assert len(expand(sweep, count=3)) == 3
    with pytest.raises(ConfigError, match="grid search needs values"):
        expand({"method": "grid", "parameters": {"a": {"min": 0.0, "max": 1.0}}})


def test_random_draws_follow_the_wandb_distributions_and_are_reproducible():
    params = {"u": {"min": 0.5, "max": 2.0}, "i": {"min": 1, "max": 3}, "c": {"values": ["p", "q"]},
              "lv": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-1},
              "q": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 2.5}, "k": {"value": 7}}
    sweep = {"method": "random", "run_cap": 200, "parameters": params}
    trials = expand(sweep, seed=3)
    assert len(trials) == 200 and trials == expand(sweep, seed=3) and trials != expand(sweep, seed=4)
    assert all(0.5 <= t["u"] <= 2.0 and t["i"] in (1, 2, 3) and t["c"] in "pq" and t["k"] == 7 for t in trials)
    assert all(1e-3 <= t["lv"] <= 1e-1 and t["q"] % 2.5 == 0 for t in trials)
    logs = [math.log10(t["lv"]) for t in trials]  # log-uniform: the decades are equally filled
    assert 0.35 < sum(x < -2 for x in logs) / len(logs) < 0.65
    assert {t["i"] for t in trials} == {1, 2, 3}
    with pytest.raises(ConfigError, match="--count"):
        expand({"method": "random", "parameters": params})
    with pytest.raises(ConfigError, match="not supported"):
        expand({"method": "random", "run_cap": 1, "parameters": {"a": {"distribution": "beta"}}})


def test_command_macros():
    sweep = {"program": "tailgen", "command": ["${env}", "tailgen", "test", "--config", "a.yaml", "${args}"]}
    argv = build_command(sweep, {"model.init_args.x": 0.5, "data.init_args.labels": [1, 2]})
    assert argv == [sys.executable, "-m", "tailgen.cli", "test", "--config", "a.yaml",
                    "--model.init_args.x=0.5", "--data.init_args.labels=[1, 2]"]
    script = {"program": "train.py"}  # W&B's default command: ${env} ${interpreter} ${program} ${args}
    assert build_command(script, {"lr": 0.1}) == [sys.executable, "train.py", "--lr=0.1"]
    hydra = {"program": "x", "command": ["${program}", "${args_no_hyphens}"]}
    assert build_command(hydra, {"a.b": 1}) == ["x", "a.b=1"]


def test_trial_names_depend_only_on_the_values():
    a = trial_name({"model.init_args.guidances.tail.init_args.scale": 2.0, "data.init_args.seed": 1})
    assert a.startswith("tail.scale=2.0_data.seed=1-")
    assert trial_name({"u": 0.123456789}).startswith("u=0.1235-")
    assert a == trial_name({"model.init_args.guidances.tail.init_args.scale": 2.0, "data.init_args.seed": 1})
    assert a != trial_name({"model.init_args.guidances.tail.init_args.scale": 2.0, "data.init_args.seed": 2})
    assert short_name("model.init_args.guidances.cg.init_args.scale") == "cg.scale"


def records(values):
    return [{"trial": str(i), "status": "done", "params": p, "metrics": m} for i, (p, m) in enumerate(values)]


def test_aggregate_averages_over_seeds_per_setting_of_the_other_parameters(tmp_path):
    offset = {"a": 0.0, "b": 10.0}
    rows = records([({"s": s, "c": c, "data.seed": seed}, {"recall": s + offset[c] + 0.1 * seed})
                    for s in (0.0, 1.0, 2.0) for c in ("a", "b") for seed in (0, 1, 2)])
    curves = aggregate(rows, "s", "recall")
    assert set(curves) == {("a",), ("b",)}  # one line per value of the other swept parameter, none per seed
    for c in ("a", "b"):
        # seeds 0, 1, 2 add 0.1 * seed: mean + 0.1, sample std 0.1
        assert curves[(c,)] == [(s, pytest.approx(s + offset[c] + 0.1), pytest.approx(0.1), 3) for s in (0.0, 1.0, 2.0)]
    single = records([({"s": s}, {"recall": s}) for s in (2.0, 0.0)])
    assert aggregate(single, "s", "recall") == {(): [(0.0, 0.0, 0.0, 1), (2.0, 2.0, 0.0, 1)]}
    paths = plot_results(rows, tmp_path, ["recall", "fid"])  # fid absent: skipped; the seed is no x axis
    assert sorted(p.name for p in paths) == ["plot_c.png", "plot_s.png"] and paths[0].stat().st_size > 0
    # a random sweep: every trial has its own setting of the others -> a point cloud per parameter
    trials = expand({"method": "random", "run_cap": 12, "parameters": {"u": {"min": 0.0, "max": 1.0},
                                                                       "v": {"min": 0.0, "max": 1.0}}})
    cloud = plot_results(records([(t, {"recall": t["u"] * t["v"]}) for t in trials]), tmp_path, ["recall"])
    assert sorted(p.name for p in cloud) == ["plot_u.png", "plot_v.png"]


TRIAL = """import json, os, sys
from pathlib import Path
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
folder = Path(os.environ["TAILGEN_TRIAL_DIR"])
with open(Path(__file__).with_name("calls.txt"), "a") as f:
    f.write(folder.name + "\\n")
if args["fail"] == "yes" and not Path(__file__).with_name("fixed").exists():
    sys.exit(3)
(folder / "metrics.json").write_text(json.dumps({"recall": float(args["x"]) / 10, "fid": 5 - float(args["x"])}))
"""


def test_resume_keeps_finished_trials_and_retries_failed_ones(tmp_path, capsys):
    (tmp_path / "trial.py").write_text(TRIAL)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"program": str(tmp_path / "trial.py"), "method": "grid",
                                     "metric": {"name": "recall", "goal": "maximize"},
                                     "parameters": {"x": {"values": [1, 2]}, "fail": {"values": ["no", "yes"]}}}, sort_keys=False))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:  # the failed trials make the exit code non-zero
        tailgen(["sweep", str(sweep), "--out", str(out), "--wandb", "disabled"])
    assert exit_info.value.code == 1
    calls = (tmp_path / "calls.txt").read_text().split()
    assert len(calls) == 4
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] == "done" for r in results] == [True, False, True, False]
    assert "failed (exit 3" in results[1]["status"] and not (out / results[1]["trial"] / "metrics.json").exists()
    (tmp_path / "fixed").touch()
    records_ = run_sweep(sweep, out, wandb_mode="disabled")
    calls = (tmp_path / "calls.txt").read_text().split()
    assert len(calls) == 6 and set(calls[4:]) == {results[1]["trial"], results[3]["trial"]}  # only the failed ones
    assert [r["skipped"] for r in records_] == [True, False, True, False]
    run_sweep(sweep, out, wandb_mode="disabled")
    assert len((tmp_path / "calls.txt").read_text().split()) == 6  # everything finished: nothing runs
    assert (out / "plot_x.png").exists() and (out / "plot_fail.png").exists() and (out / "results.csv").exists()


@pytest.mark.slow
def test_tiny_tailgen_sweep_runs_with_wandb_offline_and_resumes(tmp_path, capsys):
    """Two `tailgen test` trials (shipped Fashion models, 2 steps, 10 samples) with offline W&B logging."""
    sweep = yaml.safe_load((ROOT / "configs/sweeps/fashion_tail.yaml").read_text())
    sweep["parameters"] = {"model.init_args.guidances.tail.init_args.scale": {"values": [0.0, 4.0]}}
    at = sweep["command"].index("${args}")
    sweep["command"][at:at] = [
        "--data.init_args.num_samples=10", "--data.init_args.batch_size=10", "--model.init_args.progress=false",
        "--model.init_args.diffusion.timestep_respacing=2", "--trainer.enable_progress_bar=false",
        "--model.init_args.check_samples=false",  # 2 steps: saturated images are expected
        "--model.init_args.evaluation.init_args.max_reference=50",
        f"--model.init_args.evaluation.init_args.cache_dir={tmp_path / 'cache'}"]
    sweep["command"] = [str(ROOT / c) if c.startswith("configs/") else c for c in sweep["command"]]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    out = tmp_path / "sweep"
    first = run_sweep(path, out, wandb_mode="offline")
    assert [r["status"] for r in first] == ["done", "done"], [(out / r["trial"] / "log.txt").read_text()[-2000:] for r in first]
    for r in first:
        folder = out / r["trial"]
        assert 0 <= r["metrics"]["recall"] <= 1 and json.loads((folder / "metrics.json").read_text()) == r["metrics"]
        assert list((folder / "wandb").glob("offline-run-*")), "no offline W&B run in the trial folder"
    assert (out / "plot_tail.scale.png").stat().st_size > 0
    again = run_sweep(path, out, wandb_mode="offline")
    assert [r["skipped"] for r in again] == [True, True] and [r["metrics"] for r in again] == [r["metrics"] for r in first]
