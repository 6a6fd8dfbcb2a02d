"""tools/steps_study_report.py on constructed records with a known answer: sigma from the tail study's headline seed
sets, z against DDPM-250 per panel, the smallest matching step count; and the UNet calls it counts per sample."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import steps_study_report as ssr
import tail_study

SHA = "cd" * 32
SIGMA_HEADLINE = 0.2  # seed-set std of every metric in the constructed tail headline row (5,000 samples)
SIGMA = SIGMA_HEADLINE * math.sqrt(5000 / 2000)  # at the steps study's 2,000 samples
REF = {"fid": 10.0, "judge/fid": 20.0, "recall": 0.6, "judge/recall": 0.5, "tail/accuracy": 0.85}

# z of FID / recall / class accuracy against DDPM-250 of the same panel (judge metrics: always 0). Known answers:
# unguided: DDPM 100, DDIM 15 (10 fails FID), DPM-Solver++ 10; ADM-G: DDPM 50, DDIM none, DPM-Solver++ 15
# (10 fails class accuracy at -2.5; 25 fails recall, irrelevant: the smallest match counts); SDE-DPM-Solver++:
# unguided 15 (10 fails FID at 2.5), ADM-G 10.
Z = {
    "ddpm@50": (3.0, 0, 0), "ddpm@100": (1.9, -1.0, 0.5),
    "ddim@10": (4.0, 0, 0), "ddim@15": (1.5, 0, 0), "ddim@25": (0.2, 0, 0),
    "dpmpp_2m@10": (-1.0, 1.0, 1.9), "dpmpp_2m@15": (0, 0, 0), "dpmpp_2m@25": (0, 0, 0),
    "ddpm@50+adm_g@1": (0, 0, 0), "ddpm@100+adm_g@1": (0, 0, 0),
    "ddim@10+adm_g@1": (9.0, 0, 0), "ddim@15+adm_g@1": (0, 2.5, 0), "ddim@25+adm_g@1": (0, 0, -3.0),
    "dpmpp_2m@10+adm_g@1": (0, 0, -2.5), "dpmpp_2m@15+adm_g@1": (0.5, 0.5, 0.5),
    "dpmpp_2m@25+adm_g@1": (0, 3.0, 0),
    "dpmpp_2m_sde@10": (2.5, 0, 0), "dpmpp_2m_sde@15": (1.0, 0, 0), "dpmpp_2m_sde@25": (0, 0, 0),
    "dpmpp_2m_sde@10+adm_g@1": (0, 0, 0), "dpmpp_2m_sde@15+adm_g@1": (0, 0, 0), "dpmpp_2m_sde@25+adm_g@1": (0, 0, 0),
}


def _write(records: Path, record: dict) -> None:
    path = tail_study.record_path(records, record["run"], record["num_samples"], record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _study(tmp_path: Path, skip=()) -> tuple[dict, Path]:
    """Records of every run of the real steps plan (as the runner writes them) and the tail study's headline seed
    sets of adm_g@0 (std SIGMA_HEADLINE per metric), under tmp_path."""
    plan = tail_study.load_plan(str(ROOT / "configs/study/fashion_steps.yaml"))
    plan["_model"] = {"weights_sha256": SHA}
    records = tmp_path / "steps" / f"model_{SHA[:10]}"
    for name, run in plan["_runs"].items():
        if name in skip:
            continue
        z = dict(zip(("fid", "recall", "tail/accuracy"), Z.get(name, (0, 0, 0))))
        metrics = {k: v + z.get(k, 0) * SIGMA for k, v in REF.items()}
        _write(records, {"run": name, "method": run["method"], "value": run["value"], "adm_g": run["adm_g"],
                         "num_samples": 2000, "seed": 0, "model_args": run["model"], "steps": run["steps"],
                         "sampling": tail_study.recorded_args(plan, tail_study.init_args(plan, run)),
                         "seconds": 1.0, "model": plan["_model"], "guidances": run["guidances"], "metrics": metrics})
    tail = tmp_path / "tail"
    for seed, d in enumerate((-1, 0, 1)):  # std (ddof 1) of (-0.2, 0, 0.2) = 0.2
        _write(tail / f"model_{SHA[:10]}", {"run": "adm_g@0", "method": "adm_g", "value": 0, "adm_g": None,
                                            "num_samples": 5000, "seed": seed, "steps": 25, "guidances": {},
                                            "metrics": {k: v + d * SIGMA_HEADLINE for k, v in REF.items()}})
    _write(tail / f"model_{SHA[:10]}", {"run": "adm_g@1", "method": "adm_g", "value": 1, "adm_g": None,  # not used
                                        "num_samples": 5000, "seed": 0, "steps": 25, "guidances": {"cg": {}},
                                        "metrics": {k: 99.0 for k in REF}})
    plan["report"]["noise"] = {**plan["report"]["noise"], "records": str(tail)}
    return plan, records


def _answers(plan, records):
    cfg = {**ssr.DEFAULT, **plan["report"]}
    rows = ssr.study_rows(ssr.aggregate(ssr.collect(records)), 2000)
    sigma, units = ssr.noise(cfg, plan["_model"], 2000)
    return rows, sigma, units, ssr.compare(rows, sigma, cfg)


def test_sigma_is_the_tail_headline_seed_set_std_scaled_to_the_study_size(tmp_path):
    plan, records = _study(tmp_path)
    _, sigma, units, _ = _answers(plan, records)
    assert sorted(u["seed"] for u in units) == [0, 1, 2] and {u["run"] for u in units} == {"adm_g@0"}
    assert set(sigma) >= set(REF) and all(sigma[k] == pytest.approx(SIGMA) for k in REF)


def test_the_answer_is_the_smallest_step_count_within_two_sigma_of_ddpm_250(tmp_path):
    plan, records = _study(tmp_path)
    rows, _, _, answers = _answers(plan, records)
    steps = {key: a["steps"] for key, a in answers.items()}
    assert steps == {("unguided", "ddpm"): 100, ("unguided", "ddim"): 15, ("unguided", "dpmpp_2m"): 10,
                     ("unguided", "dpmpp_2m_sde"): 15, ("ADM-G s=1", "ddpm"): 50, ("ADM-G s=1", "ddim"): None,
                     ("ADM-G s=1", "dpmpp_2m"): 15, ("ADM-G s=1", "dpmpp_2m_sde"): 10}
    assert all(a["calls"] == a["steps"] for a in answers.values() if a["steps"])  # one UNet call per step
    assert not any(a["pending"] for a in answers.values())
    z = {r["run"]: r["z"] for r in rows}
    assert z["ddim@10"]["fid"] == pytest.approx(4.0) and z["ddpm@250"]["fid"] == 0  # each panel's own reference
    assert z["dpmpp_2m@25+adm_g@1"]["recall"] == pytest.approx(3.0)


def test_missing_rows_leave_answers_pending_or_provisional(tmp_path):
    plan, records = _study(tmp_path, skip=("ddpm@250+adm_g@1", "ddim@10"))
    _, _, _, answers = _answers(plan, records)
    assert all(a["steps"] is None for (panel, _), a in answers.items() if panel != "unguided")  # no reference
    assert answers[("unguided", "ddim")] == {"steps": 15, "calls": 15, "pending": []}  # 10 not run: 15 smallest run
    plan, records = _study(tmp_path / "b")
    cfg = {**ssr.DEFAULT, **plan["report"]}
    rows = ssr.study_rows(ssr.aggregate(ssr.collect(records)), 2000)
    sigma = {k: v for k, v in ssr.noise(cfg, plan["_model"], 2000)[0].items() if k != "recall"}  # no sigma: pending
    answers = ssr.compare(rows, sigma, cfg)
    assert answers[("unguided", "ddim")] == {"steps": None, "calls": None, "pending": [10, 15, 25]}


def test_report_writes_answers_table_csv_and_plot(tmp_path):
    plan, records = _study(tmp_path)
    docs = tmp_path / "docs"
    ssr.report(plan, records, docs)
    text = (docs / "results.md").read_text()
    assert "- unguided, DDIM (eta=0): **15 steps** (15 UNet calls per sample) match DDPM-250" in text
    assert "- ADM-G s=1, DDIM (eta=0): none of 10, 15, 25 steps matches DDPM-250" in text
    assert "- ADM-G s=1, DPM-Solver++(2M): **15 steps**" in text
    assert "sqrt(5000 / 2000)" in text and "adm_g_0/n5000_s*.json" in text
    with open(docs / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and {r["sampler"] for r in rows} == {"ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"}
    ddim10 = next(r for r in rows if r["run"] == "ddim@10")
    assert ddim10["unet_calls"] == "10" and float(ddim10["fid_z"]) == pytest.approx(4.0) and ddim10["match"] == "False"
    assert (docs / "quality_per_call.png").stat().st_size > 10_000


@pytest.mark.parametrize("sampler", sorted(ssr.CALLS_PER_STEP))
@pytest.mark.parametrize("steps", [10, 25])
def test_unet_calls_per_sample_are_counted_not_assumed(sampler, steps):
    from tailgen.diffusion import DiffusionProcess, Prediction
    from tailgen.sampling import SAMPLERS, SamplingRun

    process = DiffusionProcess.from_flags(noise_schedule="cosine", timestep_respacing=str(steps))
    calls = []

    def denoiser(x, i, labels=None, **kwargs):
        calls.append(i)
        return Prediction(eps=0.1 * x)

    SAMPLERS[sampler](SamplingRun(denoiser), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
                      process)
    assert len(calls) == ssr.unet_calls(sampler, steps) == ssr.CALLS_PER_STEP[sampler] * steps


def test_speckle_screen_grids_skip_the_degenerate_first_step():
    import speckle_screen as screen

    sigma = screen.sigmas()
    assert sigma[-1] > 1e4 and sigma[990] <= screen.SIGMA_MAX < sigma[991]  # cosine: abar(T-1) = 2.4e-9
    uniform = screen.grid("uniform", 10, sigma)
    assert len(uniform) == 10 and uniform[0] == 0 and uniform[-1] == 999
    for name in ("uniform_sigma80", "karras_sigma80", "logsnr_sigma80"):
        kept = screen.grid(name, 10, sigma)
        # the sigma nearest 80 in log: t = 990 (71) or 991 (~87)
        assert kept[0] == 0 and kept[-1] in (990, 991) and kept == sorted(set(kept)) and 8 <= len(kept) <= 10, (name, kept)
    karras = screen.grid("karras_sigma80", 25, sigma)
    assert screen.grid("logsnr_sigma80", 25, sigma) != karras != screen.grid("uniform_sigma80", 25, sigma)
