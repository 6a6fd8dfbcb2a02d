"""`tailgen test`: sampling + metrics in the Lightning test loop on the tiny fixture models, metrics.json,
evaluation of an existing samples.npz, and DDP parity (2 CPU processes == 1 process) as CLI subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FIXTURES
from test_module_predict import CLASSIFIER_FLAGS, write_config

from tailgen.cli import main

METRICS = ["fid", "precision", "recall", "density", "coverage", "classwise", "tail"]


def reference_npz(tmp_path, n=24):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=images, arr_1=np.array([1, 7] * (n // 2), dtype=np.int64))
    return path


def eval_config(tmp_path, num_samples=6):
    config = write_config(tmp_path, data={"num_samples": num_samples, "labels": [1, 7], "batch_size": 2})
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(tmp_path), "name": "logs"}}
    cfg["model"]["init_args"]["evaluation"] = {
        "metrics": METRICS, "features": "classifier", "reference": str(reference_npz(tmp_path)),
        "feature_network": {"kind": "classifier", "flags": CLASSIFIER_FLAGS,
                            "checkpoint": str(FIXTURES / "tiny_classifier32.pt")},
        "cache_dir": str(tmp_path / "cache"), "output": str(tmp_path / "metrics.json"),
    }
    del cfg["writer"]
    config.write_text(yaml.safe_dump(cfg))
    return config


def test_test_loop_writes_metrics(tmp_path, capsys):
    config = eval_config(tmp_path)
    main(["test", "--config", str(config)])
    values = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("fid", "precision", "recall", "density", "coverage", "tail/accuracy", "classwise/recall_mean"):
        assert name in values, name
    assert values["fid"] > 0 and 0 <= values["recall"] <= 1 and 0 <= values["tail/accuracy"] <= 1
    assert "fid" in capsys.readouterr().out  # the table is printed


def test_evaluates_existing_samples(tmp_path):
    """data.samples points at a samples.npz: no sampling, the file's images are measured."""
    config = eval_config(tmp_path)
    ref = np.load(tmp_path / "ref.npz")
    np.savez(tmp_path / "samples.npz", arr_0=ref["arr_0"][:8], arr_1=ref["arr_1"][:8])
    main(["test", "--config", str(config), f"--data.init_args.samples={tmp_path / 'samples.npz'}"])
    values = json.loads((tmp_path / "metrics.json").read_text())
    assert values["precision"] == pytest.approx(1.0)  # real images lie on the real manifold
    assert values["density"] > 0.5


def test_second_feature_space_from_one_pass(tmp_path, capsys):
    """evaluation.spaces: the same metrics again in another network's features, keys prefixed; here the second
    space is the same network, so its values must equal the domain ones exactly."""
    config = eval_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    evaluation = cfg["model"]["init_args"]["evaluation"]
    evaluation["metrics"] = METRICS + ["rarity", "tail_coverage"]
    evaluation["spaces"] = {"judge": evaluation["feature_network"]}
    config.write_text(yaml.safe_dump(cfg))
    ref = np.load(tmp_path / "ref.npz")
    np.savez(tmp_path / "samples.npz", arr_0=ref["arr_0"][:12], arr_1=ref["arr_1"][:12])
    main(["test", "--config", str(config), f"--data.init_args.samples={tmp_path / 'samples.npz'}"])
    values = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("fid", "precision", "coverage", "rarity", "tail_coverage", "head_coverage", "tail/accuracy",
                 "classwise/coverage_mean", "class/1/recall"):
        assert name in values and f"judge/{name}" in values, name
        assert values[f"judge/{name}"] == values[name], name
    from tailgen.module.evaluation import format_table

    assert "judge/fid" in capsys.readouterr().out
    table = format_table(values)
    assert "judge/fid" in table and "judge/class/" not in table and "\nclass/" not in table
    assert table.index("judge/fid") > table.index("tail/accuracy")  # domain headline first, then the judge's


def test_test_without_evaluation_is_a_clear_error(tmp_path, capsys):
    config = write_config(tmp_path)
    with pytest.raises(SystemExit):
        main(["test", "--config", str(config)])
    assert "needs model.evaluation" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """Run as CLI subprocesses (never DDP inside pytest): uneven shards, no duplicated samples."""
    config = eval_config(tmp_path, num_samples=5)
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(tests_dir), "OMP_NUM_THREADS": "1"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"metrics{devices}.json"
        cmd = [sys.executable, "-m", "tailgen.cli", "test", "--config", str(config),
               f"--trainer.devices={devices}", "--trainer.strategy=" + ("ddp" if devices > 1 else "auto"),
               f"--model.init_args.evaluation.init_args.output={out}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tests_dir.parent)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    for key in ("fid", "precision", "recall", "density", "coverage", "tail/accuracy"):
        assert results[2][key] == pytest.approx(results[1][key], rel=1e-4, abs=1e-5), key
