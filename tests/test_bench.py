"""tools/bench.py: presets, paired ratios, run order and the targets on constructed numbers (no reference needed);
--quick side by side with guided-diffusion and its JSON only when TAILGEN_REFERENCE names a checkout (the reference
is not part of the project)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("TAILGEN_REFERENCE", "/nonexistent"))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools/bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_ratios_are_per_repeat(bench):
    # medians alone would give 2 / 2 = 1; the per-repeat ratios are 1/3, 2 and 1.5
    out = bench.paired([1.0, 2.0, 3.0], [3.0, 1.0, 2.0])
    assert out["ratios"] == pytest.approx([1 / 3, 2.0, 1.5])
    assert (out["median"], out["min"], out["max"]) == pytest.approx((1.5, 1 / 3, 2.0))
    with pytest.raises(ValueError, match="equally many"):
        bench.paired([1.0, 2.0], [1.0])


def test_order_reverses_every_other_repeat(bench):
    names = ["tailgen[default]", "tailgen[fp32]", "reference", "bare[default]", "bare[fp32]"]
    assert [bench.run_order(names, r) for r in range(3)] == [names, names[::-1], names]


def test_presets_follow_the_constructor_defaults(bench, monkeypatch):
    class Module:  # the lead may move the defaults: `default` must follow them, `fp32` must not
        def __init__(self, autocast="auto", autocast_classifier=True, channels_last=True, attention="sdpa",
                     compile=False, quantize=None, calibration=256):
            pass
    monkeypatch.setattr(bench, "GuidedDiffusion", Module)
    presets = bench.resolve_presets(["default", "fp32", "custom"], {"compile": True})
    assert presets["default"] == {"autocast": "auto", "autocast_classifier": True, "channels_last": True,
                                  "attention": "sdpa", "compile": False, "quantize": None, "calibration": 256}
    assert presets["fp32"] == {**presets["default"], "autocast": None, "autocast_classifier": False,
                               "channels_last": False}
    assert presets["custom"] == {**presets["default"], "compile": True}
    assert bench.share_runs(presets) == {"default": ["default"], "fp32": ["fp32"], "custom": ["custom"]}
    assert bench.share_runs({"default": presets["fp32"], "fp32": presets["fp32"]}) == {"default": ["default", "fp32"]}


def test_settings_and_flags(bench):
    args = bench.parse_args(["--quick"])
    assert list(args.presets) == ["default", "fp32"]
    assert args.presets["default"] == bench.module_defaults()
    args = bench.parse_args(["--channels-last", "--autocast", "none"])  # flags alone: the custom preset only
    assert list(args.presets) == ["custom"]
    assert args.presets["custom"] == {**bench.module_defaults(), "channels_last": True, "autocast": None}
    assert list(bench.parse_args(["--settings", "fp32,custom", "--compile"]).presets) == ["fp32", "custom"]
    for bad in (["--settings", "custom"], ["--settings", "fast"], ["--quantize", "int8", "--autocast", "bf16"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def row(case, guided, preset, reference, tailgen, bare, network=None):
    network = network or [t / 1.01 for t in tailgen]
    return {"case": case, "guided": guided, "preset": preset, "batch": 2, "steps": 4, "same_runs_as": [],
            "median_per_image_s": {"tailgen": tailgen[0], "reference": reference[0], "bare": bare[0]},
            "first_call_s": {"tailgen": 1.0}, "speedup_vs_reference": ratio_of_first(reference, tailgen),
            "overhead_vs_bare": ratio_of_first(tailgen, bare), "overhead_in_run": ratio_of_first(tailgen, network),
            "best_of": {"speedup": min(reference) / min(tailgen), "overhead": min(tailgen) / min(bare)}}


def ratio_of_first(a, b):  # a paired() of one repeat
    return {"median": a[0] / b[0], "min": a[0] / b[0], "max": a[0] / b[0]}


def test_targets_and_table(bench):
    rows = [row("adm64", True, "default", [8.0], [5.0], [4.9]), row("adm64", True, "fp32", [8.0], [7.5], [7.4]),
            row("fashion", False, "fp32", [1.0], [1.0], [0.9])]
    lines = bench.targets(rows)
    assert lines[0].startswith("- guided 64x64 speed-up [default] 1.60x") and lines[0].endswith(": met")
    assert lines[1].startswith("- guided 64x64 speed-up [fp32] 1.07x") and lines[1].endswith("NOT met")
    assert "in-run, worst row" in lines[2] and "1.0100" in lines[2] and lines[2].endswith(": met")
    assert "tailgen/bare loop, worst row median 1.111" in lines[3]  # the separate-run cross-check, reported only
    slow = row("fashion", True, "fp32", [1.0], [1.0], [1.0], network=[0.95])
    assert "(fashion, guided=True, fp32) 1.0526" in bench.targets(rows + [slow])[2]
    assert bench.targets(rows + [slow])[2].endswith("NOT met")
    # met only when the best-of ratio agrees: a noisy fastest run must not pass a target the medians miss, or back
    noisy = row("adm64", True, "default", [8.0], [5.0], [4.9]) | {"best_of": {"speedup": 1.4, "overhead": 1.0}}
    assert bench.targets([noisy])[0].endswith("(best-of 1.40x), target >= 1.5x: NOT met")
    assert bench.best_of([5.0, 4.0], [9.0, 8.0], [4.4, 4.0]) == {"speedup": 2.0, "overhead": 1.0}
    table = bench.markdown(rows, {"default": {"autocast": "auto"}, "fp32": {"autocast": None}}, "header")
    assert "| adm64 | yes | default | 2 | 4 | 5.0000 | 8.0000 | 1.60x (1.60-1.60) | 1.020 (1.020-1.020) |" in table
    assert "| 1.0100 (1.0100-1.0100) | 1.0 |" in table


@pytest.mark.skipif(not (REFERENCE / "guided_diffusion").is_dir(),
                    reason="set TAILGEN_REFERENCE to a guided-diffusion checkout to run the side-by-side bench")
def test_bench_quick_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--cases", "fashion", "--reference", str(REFERENCE), "--json", str(out), "--threads", "1"])
    result = json.loads(out.read_text())
    assert [(r["case"], r["guided"], r["preset"]) for r in result["rows"]] == [
        ("fashion", True, "default"), ("fashion", True, "fp32"),
        ("fashion", False, "default"), ("fashion", False, "fp32")]
    shared = result["presets"]["default"] == result["presets"]["fp32"]  # then one set of runs stands for both
    for r in result["rows"]:
        assert set(r["per_image_s"]) == {"tailgen", "reference", "bare"}
        assert all(len(v) == 1 and v[0] > 0 for v in r["per_image_s"].values())
        assert r["overhead_vs_bare"]["ratios"] == [r["per_image_s"]["tailgen"][0] / r["per_image_s"]["bare"][0]]
        assert 0 < r["network_per_image_s"][0] < r["per_image_s"]["tailgen"][0]  # timed inside the same run
        assert r["unet_max_abs_diff_vs_reference"] < 1e-4  # same weights in both implementations
        assert r["same_runs_as"] == ([{"default": "fp32", "fp32": "default"}[r["preset"]]] if shared else [])
        assert r["order"][len(r["order"]) // 2] == "reference"
    assert "| fashion | yes | default |" in capsys.readouterr().out


def test_bench_refuses_missing_reference(bench, tmp_path):
    with pytest.raises(SystemExit, match="no guided-diffusion checkout"):
        bench.main(["--quick", "--reference", str(tmp_path)])
