"""``tailgen fit`` is the one way to train: the shipped Fashion-MNIST training configs run a step or two on a tiny
IDX folder through the console script, write checkpoints, start from shipped weights (``init_from``), resume on
re-run (``ckpt_path: last`` in the configs), and a bad value ends in one ``tailgen: error:`` line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_processes import REPO, run_all, tailgen_env
from test_data_fashion import _tiny_folder

CONFIGS = REPO / "configs" / "fashion"
SHIPPED = REPO / "tailgen" / "weights" / "fashion_diffusion_5epoch.pt"  # the init_from of train_diffusion_continue
TINY = ["--data.init_args.batch_size=4", "--data.init_args.val_size=4", "--trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion_idx")
    _tiny_folder(root, n=16, prefix="train")
    _tiny_folder(root, n=8, prefix="t10k")
    return root


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_fit_continues_from_shipped_weights_and_resumes(tmp_path, data):
    """train_diffusion_continue.yaml (init_from the shipped model): 1 step writes last.ckpt whose EMA is the shipped
    network after one update; the same command with max_steps 2 restores it and takes one more step."""
    argv = ["fit", "--config", str(CONFIGS / "train_diffusion_continue.yaml"), f"--data.init_args.root={data}", *TINY,
            f"--model.init_args.init_from={SHIPPED}"]
    (rc, out, err, folder), = run_all({"run": [*argv, "--trainer.max_steps=1"]}, tmp_path).values()
    assert rc == 0, err[-3000:]
    assert "no last.ckpt" in out + err and "starting a new run" in out + err
    assert "there is no last checkpoint available" not in err  # Lightning's misleading hint is replaced
    last = folder / "runs" / "fashion_diffusion_continue" / "checkpoints" / "last.ckpt"
    first = _ckpt(last)
    assert first["global_step"] == 1 and int(first["state_dict"]["ema_updates"]) == 10**6 + 1
    shipped = torch.load(SHIPPED, weights_only=True)
    ema = {k[len("ema."):]: v for k, v in first["state_dict"].items() if k.startswith("ema.")}
    assert ema.keys() == shipped.keys()
    assert max((ema[k].float() - v.float()).abs().max().item() for k, v in shipped.items()) < 1e-2

    (rc, out, err, _), = run_all({"run": [*argv, "--trainer.max_steps=2"]}, tmp_path).values()
    assert rc == 0, err[-3000:]
    assert "Restoring states from the checkpoint path" in out + err and str(last) in out + err
    second = _ckpt(last)
    assert second["global_step"] == 2 and int(second["state_dict"]["ema_updates"]) == 10**6 + 2


def test_fit_ect_config_and_bad_values(tmp_path, data):
    """One import, one forked process per case (tests/cli_runner.py): the ECT config trains a step and logs its
    terms; bad values exit 2 with exactly one error line naming the key, no traceback, no checkpoint."""
    ect = ["fit", "--config", str(CONFIGS / "train_noisy_classifier_ect.yaml"), f"--data.init_args.root={data}", *TINY]
    noisy = ["fit", "--config", str(CONFIGS / "train_noisy_classifier.yaml"), f"--data.init_args.root={data}", *TINY]
    cases = {
        "ect_one_step": ([*ect, "--trainer.max_steps=1", "--trainer.log_every_n_steps=1"], None),
        "negative_ect_lambda": ([*noisy, "--model.init_args.ect_lambda=-0.1"], ["ect_lambda", ">= 0"]),
        "bad_autocast": ([*noisy, "--model.init_args.autocast=bf8"], ["model.autocast", "bf16", "fp16"]),
        "key_typo": ([*noisy, "--model.init_args.ect_lamda=0.1"], ["ect_lamda"]),
        "respaced_training": ([*noisy, "--model.init_args.diffusion.timestep_respacing=250"],
                              ["timestep_respacing", "full process"]),
    }
    specs = [{"argv": argv, "cwd": str(tmp_path / name), "out": str(tmp_path / name / "_out")}
             for name, (argv, _) in cases.items()]
    for spec in specs:
        Path(spec["cwd"]).mkdir()
    (tmp_path / "cases.json").write_text(json.dumps(specs))
    subprocess.run([sys.executable, str(REPO / "tests" / "cli_runner.py"), str(tmp_path / "cases.json"), "2"],
                   env=tailgen_env(), check=True, timeout=600)
    for name, (_, keywords) in cases.items():
        out = tmp_path / name / "_out"
        rc, stderr = int((out / "rc").read_text()), (out / "stderr").read_text()
        runs = tmp_path / name / "runs"
        if keywords is None:
            assert rc == 0, stderr[-3000:]
            ckpt = _ckpt(runs / "fashion_noisy_classifier_ect" / "checkpoints" / "last.ckpt")
            assert ckpt["hyper_parameters"]["ect_lambda"] == 0.1 and ckpt["global_step"] == 1
            header = (runs / "fashion_noisy_classifier_ect" / "logs" / "version_0" / "metrics.csv"
                      ).read_text().splitlines()[0]
            assert "train/entropy_gap" in header and "train/ce" in header
            continue
        errors = [line for line in stderr.splitlines() if line.startswith("tailgen: error:")]
        assert rc == 2 and len(errors) == 1, (name, stderr[-3000:])
        assert "Traceback" not in stderr, name
        assert all(k.lower() in errors[0].lower() for k in keywords), (name, errors[0])
        assert not list(runs.rglob("*.ckpt")) if runs.exists() else True
