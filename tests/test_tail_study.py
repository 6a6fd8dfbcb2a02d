"""tools/tail_study.py: the plan expands into the intended runs, and units are claimed by one process at a time."""

import sys
from pathlib import Path

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
