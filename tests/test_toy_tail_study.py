"""tools/toy_tail_study.py and its report: the grid's expansion, the resumable results file, the aggregation and
the toy's "above the ADM-G curve" verdict on constructed curves, and a tiny end-to-end run (a few points, 3 steps)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import toy_tail_study as tts
import toy_tail_study_report as rep

from tailgen.guidance import ClassifierGuidance, SehwagHardnessGuidance


def row(std: float = 0.01, **mean) -> dict:
    keys = ("bayes_acc", "FD", "cFD", "off", *rep.DIVERSITY, *rep.SHARES)
    return {"mean": {k: mean.get(k, 0.5) for k in keys}, "std": {k: std for k in keys}}


# ADM-G-like curve: fidelity (FD) rises and every diversity metric falls with the scale
CURVE = [row(FD=f, R=d, C=d, R_rare=d, C_rare=d) for f, d in ((0.001, 0.9), (0.002, 0.8), (0.004, 0.6))]


def test_above_needs_every_metric_more_than_two_sigma_over_the_interpolated_curve():
    # at FD 0.003 the curve gives 0.7 (halfway between 0.8 and 0.6)
    above = row(FD=0.003, R=0.75, C=0.75, R_rare=0.75, C_rare=0.75)
    v = rep.axis_verdict(CURVE, above, "FD", "lower")
    assert v["comparable"] and v["above"]
    assert v["reference"]["C"] == pytest.approx(0.7) and v["z"]["C"] == pytest.approx(5.0)
    one_short = row(FD=0.003, R=0.715, C=0.75, R_rare=0.75, C_rare=0.75)  # R: z = 1.5
    v = rep.axis_verdict(CURVE, one_short, "FD", "lower")
    assert not v["above"] and v["above_each"] == {"R": False, "C": True, "R_rare": True, "C_rare": True}
    on_curve = row(FD=0.003, R=0.7, C=0.7, R_rare=0.7, C_rare=0.7)
    assert not rep.axis_verdict(CURVE, on_curve, "FD", "lower")["above"]


def test_sigma_is_the_largest_std_of_curve_and_candidate():
    noisy = row(std=0.05, FD=0.003, R=0.75, C=0.75, R_rare=0.75, C_rare=0.75)  # margin 0.05 = 1 sigma
    v = rep.axis_verdict(CURVE, noisy, "FD", "lower")
    assert v["sigma"]["C"] == pytest.approx(0.05) and not v["above"]
    noisy_curve = [dict(p, std={**p["std"], "C": 0.1}) for p in CURVE]
    v = rep.axis_verdict(noisy_curve, row(FD=0.003, R=0.75, C=0.75, R_rare=0.75, C_rare=0.75), "FD", "lower")
    assert v["sigma"]["C"] == pytest.approx(0.1) and not v["above"] and v["above_each"]["R"]


def test_outside_the_range_is_not_comparable_and_says_which_end():
    better = rep.axis_verdict(CURVE, row(FD=0.0005, R=0.95, C=0.95, R_rare=0.95, C_rare=0.95), "FD", "lower")
    assert not better["comparable"] and not better["above"]
    assert better["side"] == "better" and better["dominates"]  # 0.95 - 0.9 > 2 * 0.01 everywhere
    level = rep.axis_verdict(CURVE, row(FD=0.0005, R=0.9, C=0.95, R_rare=0.95, C_rare=0.95), "FD", "lower")
    assert level["side"] == "better" and not level["dominates"]
    worse = rep.axis_verdict(CURVE, row(FD=0.01, R=0.99, C=0.99, R_rare=0.99, C_rare=0.99), "FD", "lower")
    assert worse["side"] == "worse" and not worse["dominates"]
    # accuracy: higher is better, so a candidate below the curve's range lies at the worse end
    acc_curve = [dict(p, mean={**p["mean"], "bayes_acc": a}) for p, a in zip(CURVE, (0.99, 0.995, 1.0))]
    assert rep.axis_verdict(acc_curve, row(bayes_acc=0.98), "bayes_acc", "higher")["side"] == "worse"


def test_saturated_fidelity_axis_compares_with_the_curves_best_point():
    # every ADM-G point at accuracy 1.0: the reference at 1.0 is the largest D of the curve (conservative)
    flat = [dict(p, mean={**p["mean"], "bayes_acc": 1.0}) for p in CURVE]
    v = rep.axis_verdict(flat, row(bayes_acc=1.0, R=0.85, C=0.85, R_rare=0.85, C_rare=0.85), "bayes_acc", "higher")
    assert v["comparable"] and v["reference"]["C"] == pytest.approx(0.9) and not v["above"]


def test_one_seed_set_has_no_verdict():
    with pytest.raises(ValueError, match="at least two"):
        rep.axis_verdict(CURVE, row(std=math.nan, FD=0.003), "FD", "lower")


def test_off_flag():
    assert rep.off_flag(CURVE, row(off=0.53))  # curve's off 0.5, sigma 0.01
    assert not rep.off_flag(CURVE, row(off=0.51))


def test_expand_mirrors_the_fashion_plan():
    runs = tts.expand()
    names = list(runs)
    assert names[:6] == ["adm_g@0", "adm_g@0.25", "adm_g@0.5", "adm_g@1", "adm_g@2", "adm_g@4"]
    assert len(runs) == 6 + 4 + 4 + 7 * 6  # 3 toy values per tail plug-in, alone and on ADM-G s=1
    assert len(tts.expand(tts.parse_values(["fashion"]))) == 6 + 4 + 4 + 7 * 8  # the Fashion plan's 4 values
    assert "cads@4" in runs and "cads@4" not in tts.expand("fashion")  # the toy needs larger CADS noise
    assert "tail_target@2+adm_g@1" in runs and "cfg@1+adm_g@1" not in runs and "interval@8" in runs
    ctx = tts.Context()
    assert tts.guidances(runs["adm_g@0"], ctx) == {}
    g = tts.guidances(runs["hardness@0.2+adm_g@1"], ctx)
    assert isinstance(g["cg"], ClassifierGuidance) and g["cg"].scale == 1.0
    assert isinstance(g["hardness"], SehwagHardnessGuidance) and g["hardness"].scale == 0.2
    assert isinstance(g["hardness"]._gaussians, tts.GroupedGaussians) and g["hardness"]._gaussians.dim == 128
    assert list(tts.expand({"cads": (2.0,)})).count("cads@2") == 1
    with pytest.raises(SystemExit, match="unknown method"):
        tts.expand({"nope": (1.0,)})
    with pytest.raises(SystemExit, match="METHOD=v1"):
        tts.parse_values(["cads:1"])


def test_results_file_round_trips_and_refuses_other_settings(tmp_path):
    path = tmp_path / "results.json"
    data = tts.load_results(path, {"num_samples": 10})
    data["runs"]["a@1"] = {"method": "a", "value": 1.0, "adm_g": None, "guidances": {}}
    data["units"]["a@1"] = {"0": {"sample_seconds": 1.0, "metrics": {"R": 0.123456789}}}
    tts.save_results(path, data)
    back = tts.load_results(path, {"num_samples": 10})
    assert back["units"]["a@1"]["0"]["metrics"]["R"] == pytest.approx(0.123457, abs=1e-9)
    with pytest.raises(SystemExit, match="other settings"):
        tts.load_results(path, {"num_samples": 20})


def test_aggregate_mean_and_std_over_seed_sets():
    data = {"runs": {"a@1": {"method": "a", "value": 1.0, "adm_g": None}},
            "units": {"a@1": {"0": {"sample_seconds": 1.0, "metrics": {"R": 0.1}},
                              "1": {"sample_seconds": 3.0, "metrics": {"R": 0.3}}}}}
    r = rep.aggregate(data)["a@1"]
    assert r["n"] == 2 and r["mean"]["R"] == pytest.approx(0.2) and r["std"]["R"] == pytest.approx(0.1 * 2 ** 0.5)
    assert r["seconds"] == pytest.approx(2.0)


def test_tiny_run_resumes_and_reports(tmp_path, capsys):
    torch.manual_seed(0)
    args = ["--out", str(tmp_path), "--num-samples", "30", "--steps", "3", "--seeds", "0", "1",
            "--values", "hardness=0.2", "cads=0.5"]
    only = ["--only", "adm_g@0", "adm_g@1", "adm_g@4", "hardness@0.2+adm_g@1", "cads@0.5"]
    assert tts.main(["run", *args, *only]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["units"]) == {"adm_g@0", "adm_g@1", "adm_g@4", "hardness@0.2+adm_g@1", "cads@0.5"}
    assert all(set(u) == {"0", "1"} for u in data["units"].values())
    capsys.readouterr()
    assert tts.main(["run", *args, *only]) == 0  # everything recorded: nothing is sampled again
    assert "0 unit(s) to run, 10 already" in capsys.readouterr().out
    assert tts.main(["report", *args]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {n for n, r in summary["rows"].items() if "verdict" in r} == {"hardness@0.2+adm_g@1", "cads@0.5"}
    assert summary["rows"]["adm_g@1"]["n"] == 2
    assert (tmp_path / "rare_shares.png").stat().st_size > 0 and (tmp_path / "diversity.png").is_file()
    assert "Verdict against the ADM-G curve" in (tmp_path / "results.md").read_text()


def test_grouped_gaussians_equal_the_library_nll_and_its_gradient():
    from tailgen.guidance.hardness import ClassGaussians

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.arange(60) % 3
    ref = ClassGaussians.fit(feats, labels, 3, shrinkage=0.1)
    fast = tts.GroupedGaussians(ref.means, ref.covs)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2, 0, 2, 1, 1, 2, 0])
    a, b = ref.nll(x, y), fast.nll(x, y)
    assert torch.allclose(a, b, atol=1e-10)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    assert torch.allclose(ga, gb, atol=1e-10)


def test_sigma_rows_choose_where_sigma_comes_from():
    noisy_end = CURVE[:2] + [dict(CURVE[2], std={**CURVE[2]["std"], "C": 0.1})]
    cand = row(FD=0.003, R=0.75, C=0.75, R_rare=0.75, C_rare=0.75)
    assert not rep.axis_verdict(noisy_end, cand, "FD", "lower")["above"]  # sigma_C 0.1 from the noisy end
    v = rep.axis_verdict(noisy_end, cand, "FD", "lower", sigma_rows=noisy_end[:1])
    assert v["sigma"]["C"] == pytest.approx(0.01) and v["above"]


def test_off_flag_counts_from_the_truth_when_the_curve_is_below_it():
    assert not rep.off_flag(CURVE, row(off=0.53), floor=0.6)  # curve's off 0.5 < truth 0.6
    assert rep.off_flag(CURVE, row(off=0.63), floor=0.6)
