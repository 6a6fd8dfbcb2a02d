"""tools/tail_study.py: the plan expands into the intended runs, and units are claimed by one process at a time."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import tail_study  # noqa: E402


def test_plan_expands_methods_alone_and_on_adm_g():
    plan = tail_study.load_plan(str(ROOT / "configs/study/fashion_tail.yaml"))
    runs = plan["_runs"]
    assert runs["adm_g@0"]["guidances"] == {}  # s = 0: no guidance at all
    assert runs["adm_g@2"]["guidances"]["cg"]["init_args"]["scale"] == 2
    combo = runs["cads@0.5+adm_g@1"]["guidances"]
    assert list(combo) == ["cg", "cads"]  # ADM-G first, then the method
    assert combo["cg"]["init_args"]["scale"] == 1 and combo["cads"]["init_args"]["scale"] == 0.5
    assert "cads@0.5" in runs and "cg" not in runs["cads@0.5"]["guidances"]
    units = tail_study.units(plan, "headline", None)
    assert {seed for _, _, seed in units} == {0, 1, 2} and all(n == 5000 for _, n, _ in units)


def test_a_unit_is_claimed_once(tmp_path):
    assert tail_study.claim(tmp_path)
    assert not tail_study.claim(tmp_path)  # held by a live process (this one)
    (tmp_path / "lock").write_text("999999999")
    assert tail_study.claim(tmp_path)  # a dead process's lock is taken over


def test_grid_order_visits_every_method_before_repeating_one():
    plan = tail_study.load_plan(str(ROOT / "configs/study/fashion_tail.yaml"))
    order = [r for r, _, _ in tail_study.units(plan, "grid", None)]
    assert sorted(order) == sorted(plan["_runs"])  # every run exactly once
    methods = list(plan["methods"])
    first = [plan["_runs"][r]["method"] for r in order[: len(methods)]]
    assert first == methods  # one run of each method before any method's second
    for method in methods:  # a method's runs on top of ADM-G come before its runs alone
        mine = [plan["_runs"][r]["adm_g"] for r in order if plan["_runs"][r]["method"] == method]
        assert mine == sorted(mine, key=lambda a: a is None)


def test_a_recorded_unit_is_skipped(tmp_path, capsys):
    plan = tail_study.load_plan(str(ROOT / "configs/study/fashion_tail.yaml"))
    run = plan["_runs"]["cads@0.5+adm_g@1"]
    args = (plan, "cads@0.5+adm_g@1", run, 2000, 0, tmp_path / "out", tmp_path / "records", False, True)
    assert tail_study.run_unit(*args)  # dry run: would run it, prints the commands
    assert "tailgen predict" in capsys.readouterr().out
    record = tail_study.record_path(tmp_path / "records", "cads@0.5+adm_g@1", 2000, 0)
    assert record.name == "n2000_s0.json" and record.parent.name == "cads_0.5__adm_g_1"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    assert not tail_study.run_unit(*args)  # finished (its record exists): skipped
    assert not (tmp_path / "out").exists()


def test_rarest_on_manifold_picks_rare_samples_inside_the_real_manifold():
    import numpy as np
    import torch

    from tail_study_report import rarest_on_manifold

    def pixels(images):  # features = the first pixel value; the report hands over NCHW (1 channel, 2 x 3 pixels)
        assert images.shape[1:] == (1, 2, 3)
        return {"pool": torch.as_tensor(images).reshape(len(images), -1)[:, :1].float()}

    def img(v):  # samples.npz layout: H x W x C
        return np.full((2, 3, 1), v, dtype=np.uint8)

    # real class 0 at 0, 1, 2, 10 (the point 10 has a large ball: radius 8 for k=1); class 1 at 100, 101
    real = np.stack([img(v)[..., 0] for v in (0, 1, 2, 10, 100, 101)])  # Fashion-MNIST layout: N x H x W
    real_labels = np.array([0, 0, 0, 0, 1, 1])
    # fakes of class 0: 1 (dense), 9 (inside only the big ball -> rarest), 50 (inside no ball: off-manifold)
    fake = np.stack([img(v) for v in (1, 9, 50, 100)])
    labels = np.array([0, 0, 0, 1])
    picked, picked_labels = rarest_on_manifold(fake, labels, real, real_labels, pixels, k=1, per_class=5)
    assert picked.shape[1:] == (2, 3, 1)
    assert picked[:, 0, 0, 0].tolist() == [9, 1, 100]  # rarest first, the off-manifold 50 never shown
    assert picked_labels.tolist() == [0, 0, 1]


STUDY_PLANS = ["configs/study/fashion_tail.yaml", "configs/study/fashion_tail_5epoch.yaml"]  # final, screening model


def test_readme_tables_are_the_reports_of_the_committed_records():
    """README has one tail-study table per model, each generated from that model's records (`python
    tools/tail_study.py report --plan PLAN`); a record added or changed without rerunning the report fails here, and
    so does a model with records but no plan that reports it."""
    from tail_study_report import readme_block, study_table

    readme = (ROOT / "README.md").read_text()
    reported = set()
    for plan_path in STUDY_PLANS:
        plan = tail_study.load_plan(str(ROOT / plan_path))
        records = tail_study.study_folders(plan)["records"]
        assert records.parent == ROOT / "docs/tail_study/units", plan_path
        assert readme_block(*study_table(plan, records), records.name) in readme, plan_path
        reported.add(records.name)
    assert {p.name for p in (ROOT / "docs/tail_study/units").glob("model_*")} == reported


def test_a_plan_extends_another_key_by_key(tmp_path):
    (tmp_path / "a.yaml").write_text("setting: {base: a.yaml, steps: 25, grid: {num_samples: 2}}\nheadline: [x, y]\n"
                                     "methods: {}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/b.yaml").write_text("extends: ../a.yaml\nsetting: {base: b.yaml, grid: {seeds: [0]}}\n"
                                         "headline: [z]\n")
    plan = tail_study.read_plan(tmp_path / "sub/b.yaml")
    assert plan["setting"] == {"base": "b.yaml", "steps": 25, "grid": {"num_samples": 2, "seeds": [0]}}
    assert plan["headline"] == ["z"] and "extends" not in plan  # lists replace; mappings merge


def test_the_screening_plan_is_the_tail_plan_on_the_5epoch_model():
    final, screening = (tail_study.load_plan(str(ROOT / p)) for p in STUDY_PLANS)
    assert screening["_runs"] == final["_runs"] and screening["methods"] == final["methods"]
    assert screening["setting"]["base"] == "configs/study/base_5epoch.yaml"
    assert {k: v for k, v in screening["setting"].items() if k != "base"} == \
        {k: v for k, v in final["setting"].items() if k != "base"}


def test_readme_figures_are_committed_report_outputs():
    """Every image README shows from docs/tail_study/ is a committed file whose name the report writes
    (``<space>_<y>_vs_<x>_n<N>.png`` for one of its plots, ``grid_`` / ``rarest_`` of a run)."""
    import re

    from tail_study_report import DEFAULT_REPORT

    shown = re.findall(r'<img src="(docs/tail_study/[^"]+)"', (ROOT / "README.md").read_text())
    assert shown, "README shows no tail-study figure"
    plotted = {f"{space}_{y.replace('/', '_')}_vs_{x}_n" for space in DEFAULT_REPORT["spaces"]
               for x, y in DEFAULT_REPORT["plots"]}
    for path in shown:
        assert (ROOT / path).is_file(), path
        name = Path(path).name
        assert name.startswith(("grid_", "rarest_")) or any(name.startswith(p) for p in plotted), name


def test_update_readme_replaces_only_the_generated_block(tmp_path):
    from tail_study_report import readme_markers, update_readme

    begin, end = readme_markers("model_x")
    other = "\n".join(readme_markers("model_y"))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{begin}\nold\n{end}\n{other}\noutro\n")
    update_readme(readme, f"{begin}\nnew\n{end}", "model_x")
    assert readme.read_text() == f"intro\n{begin}\nnew\n{end}\n{other}\noutro\n"
    with pytest.raises(SystemExit, match="no table for model_z"):
        update_readme(readme, "x", "model_z")


def test_study_processes_stop_at_a_unit_boundary_when_asked(tmp_path):
    assert tail_study.should_stop(tmp_path, None) is None
    assert tail_study.should_stop(tmp_path, time.time() + 60) is None  # not yet
    assert "deadline" in tail_study.should_stop(tmp_path, time.time() - 1)
    (tmp_path / "STOP").touch()
    assert "STOP" in tail_study.should_stop(tmp_path, None)


def test_deadline_is_the_next_such_time_across_midnight():
    import datetime as dt

    evening = dt.datetime(2026, 12, 1, 22, 10).timestamp()
    assert dt.datetime.fromtimestamp(tail_study.parse_deadline("00:40", evening)) == dt.datetime(2026, 12, 2, 0, 40)
    assert dt.datetime.fromtimestamp(tail_study.parse_deadline("23:05", evening)) == dt.datetime(2026, 12, 1, 23, 5)
    for bad in ("24:00", "7pm", "12:5", "+90", "+-5m", "90m"):
        with pytest.raises(SystemExit, match=r"HH:MM.*\+Nm.*YYYY-MM-DDTHH:MM"):
            tail_study.parse_deadline(bad, evening)


def test_deadline_as_a_duration_from_now():
    now = 1_800_000_000.0
    assert tail_study.parse_deadline("+90m", now) == now + 5400
    assert tail_study.parse_deadline("+1.5h", now) == now + 5400
    assert tail_study.parse_deadline(" +0m ", now) == now


def test_deadline_as_a_date_and_time_never_moves_to_tomorrow():
    import datetime as dt

    evening = dt.datetime(2026, 12, 1, 22, 10).timestamp()
    passed = tail_study.parse_deadline("2026-12-01T21:00", evening)
    assert dt.datetime.fromtimestamp(passed) == dt.datetime(2026, 12, 1, 21, 0)  # "21:00" would be tomorrow's
    assert passed < evening
    for bad in ("2026-13-01T21:00", "2026-12-01 21:00", "2026-12-01T25:00"):
        with pytest.raises(SystemExit, match=r"YYYY-MM-DDTHH:MM"):
            tail_study.parse_deadline(bad, evening)


def test_seed_noise_needs_every_headline_seed_set():
    from tail_study_report import seed_noise

    def row(seeds, std):
        return {"seeds": seeds, "std": {"recall": std}}

    table = {("a", 5000): row([0, 1], 0.0), ("b", 2000): row([0, 1, 2], 9.0)}
    assert seed_noise(table, 5000, 2000, min_seeds=3) == {}  # two seed sets are not enough; other sizes ignored
    table[("c", 5000)] = row([0, 1, 2], 0.01)
    assert abs(seed_noise(table, 5000, 2000, min_seeds=3)["recall"] - 0.01 * (5000 / 2000) ** 0.5) < 1e-12


def _study(rows: dict) -> tuple[dict, dict, dict]:
    """A constructed study: ADM-G curve at 2000 (accuracy 0.8 -> 1.0, recall 0.9 -> 0.7), a 5000 headline row with
    3 seed sets (sigma 0.01 for every metric), and the candidate rows given as {run: (method, accuracy, recall,
    rarity_outside)}; every diversity metric equals recall, so mean z = z(recall)."""
    from tail_study_report import DEFAULT_REPORT

    cfg = {**DEFAULT_REPORT, "spaces": {"judge": "judge/"}}
    div = ["judge/" + d for d in cfg["diversity"]]

    def row(method, value, acc, recall, outside=0.0, n_seeds=1, std=float("nan")):
        mean = {"tail/accuracy": acc, "judge/fid": 1.0, "judge/rarity_outside": outside, **{d: recall for d in div}}
        return {"info": {"method": method, "value": value}, "seeds": list(range(n_seeds)), "mean": mean,
                "std": {k: std for k in mean}}

    table = {("adm_g@0", 2000): row("adm_g", 0, 0.8, 0.9), ("adm_g@1", 2000): row("adm_g", 1, 1.0, 0.7),
             ("adm_g@0", 5000): row("adm_g", 0, 0.8, 0.9, n_seeds=3, std=0.01)}
    for run, (method, acc, recall, outside) in rows.items():
        table[(run, 2000)] = row(method, 1, acc, recall, outside)
    plan = {"curve": "adm_g", "tail_methods": ["tail_target"],
            "setting": {"grid": {"num_samples": 2000}, "headline": {"num_samples": 5000, "seeds": [0, 1, 2]}}}
    return plan, table, cfg


def test_the_pick_is_the_largest_mean_margin_among_comparable_unflagged_rows():
    from tail_study_report import off_manifold, picks, ranking, verdicts

    plan, table, cfg = _study({
        "tail_target@1": ("tail_target", 0.9, 0.83, 0.0),     # curve at 0.9: recall 0.8 -> +0.03
        "tail_target@2": ("tail_target", 0.9, 0.95, 0.5),     # larger margin, but off-manifold
        "tail_target@3": ("tail_target", 0.5, 0.99, 0.0),     # accuracy outside the curve: not comparable
        "interval@2": ("interval", 0.95, 0.80, 0.0),          # curve at 0.95: 0.75 -> +0.05
        "cads@1": ("cads", 0.9, 0.78, 0.0)})                  # below the curve
    flags = off_manifold(plan, table, cfg)
    assert flags == {("tail_target@2", 2000): ["judge"]}
    chosen = picks(plan, table, verdicts(plan, table, cfg), flags)
    sigma = 0.01 * (5000 / 2000) ** 0.5
    assert chosen["tail"]["run"] == "tail_target@1" and abs(chosen["tail"]["mean_z"] - 0.03 / sigma) < 1e-9
    assert chosen["competitor"]["run"] == "interval@2" and abs(chosen["competitor"]["mean_z"] - 0.05 / sigma) < 1e-9
    ranked = ranking(plan, table, verdicts(plan, table, cfg), flags)  # the pick heads its group's ranking
    assert [r["run"] for r in ranked["competitor"]] == ["interval@2", "cads@1"]
    assert [r["run"] for r in ranked["tail"]] == ["tail_target@1"] and ranked["tail"][0] == chosen["tail"]


def test_no_pick_before_the_seed_set_noise_exists():
    from tail_study_report import off_manifold, picks, verdicts

    plan, table, cfg = _study({"tail_target@1": ("tail_target", 0.9, 0.83, 0.9)})
    table[("adm_g@0", 5000)]["seeds"] = [0, 1]  # two seed sets: no sigma yet
    flags = off_manifold(plan, table, cfg)
    assert flags == {} and picks(plan, table, verdicts(plan, table, cfg), flags) == {}


def test_the_adm_g_pick_is_the_guided_scale_with_the_lowest_domain_fid_at_the_grid_size():
    from tail_study_report import picks

    plan, table, cfg = _study({"interval@2": ("interval", 0.95, 0.80, 0.0)})
    table[("adm_g@0.5", 2000)] = {**table[("adm_g@1", 2000)], "info": {"method": "adm_g", "value": 0.5}}
    for (run, n), fid in {("adm_g@0", 2000): 0.5, ("adm_g@0.5", 2000): 0.9, ("adm_g@1", 2000): 0.8,
                          ("adm_g@0", 5000): 0.1, ("interval@2", 2000): 0.2}.items():
        table[(run, n)] = {**table[(run, n)], "mean": {**table[(run, n)]["mean"], "fid": fid}}
    # unguided (s = 0), another size and another method do not count: s=1 (0.8) beats s=0.5 (0.9)
    assert picks(plan, table, {}, {})["adm_g"] == {"run": "adm_g@1", "n": 2000, "fid": 0.8}


def test_a_row_outside_the_curve_is_described_against_the_nearest_curve_point():
    """No verdict outside the curve's fidelity range (PROTOCOL.md), but the report says where the row stands: the
    curve point with the closest fidelity, the range, and z against that point."""
    from tail_study_report import nearest_curve_point

    named = [("adm_g@0", {"fid": 1.0, "recall": 0.80}), ("adm_g@1", {"fid": 0.8, "recall": 0.70}),
             ("adm_g@2", {"fid": 1.5, "recall": 0.60})]
    near = nearest_curve_point(named, {"fid": 0.7, "recall": 0.75}, "fid", ["recall"], {"recall": 0.01})
    assert near["run"] == "adm_g@1" and near["range"] == [0.8, 1.5]
    assert near["z"]["recall"] == pytest.approx(5.0)


def test_headline_rows_are_compared_with_the_curve_paired_by_seed_set():
    from tail_study_report import DEFAULT_REPORT, aggregate, headline_differences

    def unit(run, method, value, seed, recall, n=5000):
        return {"run": run, "method": method, "value": value, "num_samples": n, "seed": seed,
                "metrics": {"tail/accuracy": 0.9, "judge/recall": recall}}

    units = [unit("interval@4", "interval", 4, s, r) for s, r in ((2, 0.84), (0, 0.83), (1, 0.86))]
    units += [unit("adm_g@0", "adm_g", 0, s, r) for s, r in ((1, 0.82), (0, 0.80), (2, 0.81))]
    units += [unit("adm_g@0.25", "adm_g", 0.25, s, 0.5) for s in (0, 1)]  # two seed sets: not a headline row yet
    units += [unit("adm_g@1", "adm_g", 1, 0, 0.1, n=2000)]                 # grid size: not a headline row
    plan = {"curve": "adm_g", "setting": {"headline": {"num_samples": 5000, "seeds": [0, 1, 2]}}}
    cfg = {**DEFAULT_REPORT, "spaces": {"judge": "judge/"}}
    (d,) = headline_differences(plan, aggregate(units), cfg)
    assert (d["run"], d["reference"], d["n"]) == ("interval@4", "adm_g@0", 5000)
    recall = d["delta"]["judge/recall"]  # paired: seed k minus seed k = 0.03, 0.04, 0.03
    sigma = float(np.std([0.83, 0.86, 0.84], ddof=1))  # the larger headline std (adm_g@0's is 0.01)
    assert abs(recall["mean"] - 0.1 / 3) < 1e-12
    assert abs(recall["std"] - float(np.std([0.03, 0.04, 0.03], ddof=1))) < 1e-12
    assert abs(recall["z"] - (0.1 / 3) / sigma) < 1e-9
    assert d["delta"]["tail/accuracy"]["mean"] == 0.0 and "judge/fid" not in d["delta"]


def test_a_method_model_override_reaches_its_runs_only():
    plan = tail_study.load_plan(str(ROOT / "configs/study/fashion_tail.yaml"))
    plan["methods"]["x"] = {"guidances": {"cg": {"class_path": "C", "init_args": {}}}, "knob": "cg.scale",
                            "values": [1], "with_adm_g": [1], "model": {"classifier": {"preset": "other"}}}
    runs = tail_study.expand(plan)
    assert runs["x@1"]["model"] == runs["x@1+adm_g@1"]["model"] == {"classifier": {"preset": "other"}}
    assert runs["adm_g@1"]["model"] == {}


STEPS_PLAN = str(ROOT / "configs/study/fashion_steps.yaml")


def test_steps_plan_expands_samplers_and_step_counts_alone_and_on_adm_g():
    plan = tail_study.load_plan(STEPS_PLAN)
    runs = plan["_runs"]
    counts = {"ddpm": [50, 100, 250], "ddim": [10, 15, 25], "dpmpp_2m": [10, 15, 25], "dpmpp_2m_sde": [10, 15, 25]}
    assert sorted(runs) == sorted(f"{s}@{k}{g}" for s, ks in counts.items() for k in ks for g in ("", "+adm_g@1"))
    assert all(r["method"] != "adm_g" for r in runs.values())  # the curve method only lends its guidance
    for name, run in runs.items():
        sampler, steps = name.split("+")[0].split("@")
        assert run["steps"] == run["value"] == int(steps) and run["model"]["sampler"] == sampler
        args = tail_study.init_args(plan, run)
        assert args["sampler"] == sampler and args["classifier"] == {"preset": "fashion_noisy_classifier"}
        assert {"autocast", "autocast_classifier", "channels_last"} <= set(args)  # precision pinned in the plan
    assert runs["ddim@10"]["model"]["eta"] == 0
    assert runs["dpmpp_2m@15"]["guidances"] == {}
    cg = runs["dpmpp_2m@15+adm_g@1"]["guidances"]["cg"]
    assert cg["class_path"] == "tailgen.guidance.ClassifierGuidance" and cg["init_args"]["scale"] == 1


def test_steps_plan_options_are_valid_module_arguments():
    import inspect

    from tailgen.module.guided import GuidedDiffusion
    from tailgen.sampling import SAMPLERS

    plan = tail_study.load_plan(STEPS_PLAN)
    accepted = set(inspect.signature(GuidedDiffusion.__init__).parameters)
    for run in plan["_runs"].values():
        args = tail_study.init_args(plan, run)
        assert set(args) <= accepted and args["sampler"] in SAMPLERS
    assert set(plan["record_args"]) <= accepted


def test_steps_plan_order_references_first_then_cheapest_unguided_first():
    plan = tail_study.load_plan(STEPS_PLAN)
    order = [r for r, _, _ in tail_study.units(plan, "grid", None)]
    assert sorted(order) == sorted(plan["_runs"]) and order[:2] == ["ddpm@250", "ddpm@250+adm_g@1"]
    rest = [(plan["_runs"][r]["steps"], bool(plan["_runs"][r]["guidances"])) for r in order[2:]]
    assert rest == sorted(rest) and rest[0] == (10, False) and rest[-1] == (100, True)
    assert tail_study.units(plan, "grid", ["ddim@15"]) == [("ddim@15", 2000, 0)]


def _fake_tailgen(monkeypatch, seen):
    """``tailgen predict`` / ``test`` replaced by writing what they would (samples.json, metrics.json)."""
    def call(argv, stdout, stderr, cwd):
        root = next(a for a in argv if a.startswith("--trainer.default_root_dir="))
        stage, folder = argv[3], Path(root.split("=", 1)[1])
        seen.append(argv[3:])
        (folder / ("samples.json" if stage == "predict" else "metrics.json")).write_text('{"fid": 1.5}')
        return 0
    monkeypatch.setattr(tail_study.subprocess, "call", call)


def _run(plan, name, tmp_path, monkeypatch):
    import json

    plan["_model"] = {"network": {"preset": "x"}, "weights_sha256": "ab" * 32}
    seen = []
    _fake_tailgen(monkeypatch, seen)
    assert tail_study.run_unit(plan, name, plan["_runs"][name], 2000, 0, tmp_path / "out", tmp_path / "rec", False,
                               False)
    record = json.loads(tail_study.record_path(tmp_path / "rec", name, 2000, 0).read_text())
    overlay = (tail_study.unit_dir(tmp_path / "out", name, 2000, 0) / "guidances.yaml").read_text()
    return record, seen, overlay


def test_a_steps_unit_samples_with_its_sampler_and_steps_and_records_both(tmp_path, monkeypatch):
    import yaml

    plan = tail_study.load_plan(STEPS_PLAN)
    record, seen, overlay = _run(plan, "ddim@10+adm_g@1", tmp_path, monkeypatch)
    assert [argv[0] for argv in seen] == ["predict", "test"]
    for argv in seen:  # both stages see the run's respacing, not another plan's
        assert "--model.init_args.diffusion={timestep_respacing: '10'}" in argv
    args = yaml.safe_load(overlay)["model"]["init_args"]
    assert args["sampler"] == "ddim" and args["eta"] == 0 and args["guidances"]["cg"]["init_args"]["scale"] == 1
    assert record["steps"] == 10 and record["run"] == "ddim@10+adm_g@1" and record["metrics"] == {"fid": 1.5}
    assert record["sampling"] == {"sampler": "ddim", "eta": 0, "autocast": "auto", "autocast_classifier": True,
                                  "channels_last": "auto"}


def test_a_tail_unit_runs_and_records_as_before(tmp_path, monkeypatch):
    plan = tail_study.load_plan(str(ROOT / "configs/study/fashion_tail.yaml"))
    assert all(run["steps"] == 25 for run in plan["_runs"].values())
    record, seen, _ = _run(plan, "cads@0.5+adm_g@1", tmp_path, monkeypatch)
    assert all("--model.init_args.diffusion={timestep_respacing: '25'}" in argv for argv in seen)
    assert list(record) == ["run", "method", "value", "adm_g", "num_samples", "seed", "steps", "seconds", "model",
                            "guidances", "metrics"]  # the keys of the committed tail records, in their order
    assert record["steps"] == 25


def test_plan_paths_default_to_the_tail_study_and_flags_win(monkeypatch, tmp_path):
    tail = tail_study.load_plan(str(ROOT / "configs/study/fashion_tail.yaml"))
    steps = tail_study.load_plan(STEPS_PLAN)
    assert tail_study.paths(tail) == {k: str(ROOT / v) for k, v in tail_study.DEFAULT_PATHS.items()}
    assert tail_study.paths(steps) == {"out": str(ROOT / "runs/steps_study"),
                                       "records": str(ROOT / "docs/steps_study/units"),
                                       "docs": str(ROOT / "docs/steps_study")}
    assert tail_study.paths(steps, records="/x")["records"] == "/x"
    # a relative flag is made absolute against the current directory: the units' commands run from the repository
    # root, and `tailgen test` would put a relative metrics path under its logger's folder
    monkeypatch.chdir(tmp_path)
    assert tail_study.paths(steps, out="scratch")["out"] == str(tmp_path.resolve() / "scratch")


def test_bad_steps_values_fail_with_one_line():
    import pytest

    plan = {"setting": {}, "methods": {"ddim": {"knob": "steps", "values": [0]}}}
    with pytest.raises(SystemExit, match="steps must be counts"):
        tail_study.expand(plan)
    plan = {"setting": {}, "methods": {"x": {"guidances": {"g": {}}, "knob": "g.scale", "values": [1]}}}
    with pytest.raises(SystemExit, match="has no steps"):
        tail_study.expand(plan)
