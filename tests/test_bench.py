"""tools/bench.py --quick runs tailgen and guided-diffusion side by side and writes its JSON. The reference checkout is
not part of the project: the side-by-side test runs only when TAILGEN_REFERENCE names one."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("TAILGEN_REFERENCE", "/nonexistent"))


@pytest.mark.skipif(not (REFERENCE / "guided_diffusion").is_dir(),
                    reason="set TAILGEN_REFERENCE to a guided-diffusion checkout to run the side-by-side bench")
def test_bench_quick_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools/bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--cases", "fashion", "--reference", str(REFERENCE), "--json", str(out), "--threads", "1"])
    result = json.loads(out.read_text())
    assert [(r["case"], r["guided"]) for r in result["rows"]] == [("fashion", True), ("fashion", False)]
    for row in result["rows"]:
        assert set(row["median_per_image_s"]) == {"tailgen", "reference", "bare"}
        assert all(v > 0 for v in row["median_per_image_s"].values())
        assert row["unet_max_abs_diff_vs_reference"] < 1e-4  # same weights in both implementations
    assert "| fashion | yes |" in capsys.readouterr().out


def test_bench_refuses_missing_reference(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools/bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit, match="no guided-diffusion checkout"):
        bench.main(["--quick", "--reference", str(tmp_path)])
