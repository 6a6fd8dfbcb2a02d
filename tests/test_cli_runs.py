"""Runs keep to folders of their own (issue 13.2): predict's config.yaml beside its samples, every ``tailgen test``
in its own run folder (config.yaml + metrics.json, whatever the logger), distinct W&B run names with the full
config, guidances in hparams.yaml, test keeps its samples when asked, group-readable files. Tiny random networks
(the bad-input kit of tests/test_cli_errors.py); runs that could collide are started together in one shared
root folder."""

from __future__ import annotations

import datetime
import json
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli_processes import run_all, run_forked
from test_cli_errors import CLF, UNET, new_kit
from tailgen.cli import wandb_name_given
from tailgen.module.run_folder import claim_version, config_name, run_name
from tailgen.utils.io import atomic_write

SCALE = "--model.init_args.guidances.cg.init_args.scale"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, kit = new_kit(tmp_path_factory, "cli_runs")
    shared = root / "shared"
    # a CSV logger with a name, as configs/fashion/eval.yaml has: a W&B logger chosen on the command line
    # inherits that name from it (the run names this issue reports)
    (kit / "csv.yaml").write_text(yaml.safe_dump({"trainer": {"logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(shared / "logs"), "name": "fashion_test"}}}}))
    base = ["--config", str(kit / "base.yaml"), "--data.init_args.num_samples=4", "--data.init_args.batch_size=2",
            "--model.init_args.check_samples=false",  # random networks make saturated images
            f"--trainer.default_root_dir={shared}"]
    test = ["test", *base, "--config", str(kit / "eval.yaml")]
    wandb = ["--config", str(kit / "csv.yaml"), "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
             "--trainer.logger.offline=true", "--trainer.logger.project=tailgen-tests"]
    argvs = {
        "predict_a": ["predict", *base, f"{SCALE}=1.0", f"--writer.output_dir={shared / 'a'}"],
        "predict_b": ["predict", *base, f"{SCALE}=3.0", f"--writer.output_dir={shared / 'b'}"],
        "test_1": [*test, f"{SCALE}=1.0", "--model.init_args.evaluation.init_args.keep_samples=true"],
        "test_3": [*test, f"{SCALE}=3.0"],
        "csv_1": [*test, f"{SCALE}=1.0", "--config", str(kit / "csv.yaml")],
        "csv_3": [*test, f"{SCALE}=3.0", "--config", str(kit / "csv.yaml")],
        "wandb_1": [*test, f"{SCALE}=1.0", *wandb],
        "wandb_3": [*test, f"{SCALE}=3.0", *wandb],
    }
    # evaluating samples where a predict left them: the test's config must not replace predict's config.yaml
    predicted = root / "predicted"
    predicted.mkdir()
    (predicted / "samples.npz").write_bytes((kit / "samples.npz").read_bytes())
    (predicted / "samples.json").write_text(json.dumps({"config_hash": "0" * 64, "command": "predict"}))
    (predicted / "config.yaml").write_text("# the predict's config\n")
    argvs["in_place"] = [*test, f"--data.init_args.samples={predicted / 'samples.npz'}",
                         f"--model.init_args.evaluation.init_args.output={predicted / 'metrics.json'}"]
    # W&B runs as real processes (a forked runner's child ends with os._exit: W&B would never write its run file)
    wandb_argvs = {name: argvs.pop(name) for name in ("wandb_1", "wandb_3")}
    old = os.umask(0o022)
    try:  # everything started together: runs that could clash do run at the same time
        with ThreadPoolExecutor(1) as pool:
            wandb_runs = pool.submit(run_all, wandb_argvs, root, env={"WANDB_SILENT": "true"})
            out = {**run_forked(argvs, root, jobs=len(argvs)), **wandb_runs.result()}
    finally:
        os.umask(old)
    for name, (rc, _, stderr, _) in out.items():
        assert rc == 0, (name, stderr)
    return {"shared": shared, "predicted": predicted, **out}


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _scale(config: dict) -> float:
    return config["model"]["init_args"]["guidances"]["cg"]["init_args"]["scale"]


def test_predicts_write_their_config_beside_their_samples(runs):
    shared = runs["shared"]
    for name, scale in (("a", 1.0), ("b", 3.0)):
        config = _config(shared / name / "config.yaml")
        assert Path(config["writer"]["output_dir"]).name == name and _scale(config) == scale
        assert (shared / name / "samples.npz").is_file() and (shared / name / "samples.json").is_file()
    assert not (shared / "config.yaml").exists()  # nothing in the shared default_root_dir


def _run_folders(root: Path, pattern: str = "version_*/metrics.json") -> dict[float, Path]:
    """guidance scale -> the folder of the one metrics.json of that test run under ``root``."""
    folders = [p.parent for p in root.glob(pattern)]
    by_scale = {_scale(_config(f / "config.yaml")): f for f in folders}
    assert len(by_scale) == len(folders) == 2, folders
    return by_scale


def test_tests_without_a_logger_get_a_version_folder_each(runs):
    shared = runs["shared"]
    folders = _run_folders(shared)
    assert sorted(f.name for f in folders.values()) == ["version_0", "version_1"]  # started together, no clash
    for f in folders.values():
        assert (f / "grid.png").is_file() and json.loads((f / "metrics.json").read_text())["fid"] > 0
    assert not (shared / "metrics.json").exists()


def test_csv_runs_keep_metrics_config_and_hparams_with_guidances_together(runs):
    folders = _run_folders(runs["shared"] / "logs" / "fashion_test")
    assert sorted(f.name for f in folders.values()) == ["version_0", "version_1"]
    for scale, f in folders.items():
        hparams = _config(f / "hparams.yaml")
        assert hparams["guidances"]["cg"]["init_args"]["scale"] == scale
        assert hparams["guidances"]["cg"]["class_path"].endswith("ClassifierGuidance")
        assert (f / "metrics.csv").is_file()


def test_wandb_runs_get_distinct_names_and_the_full_config(runs):
    logs = runs["shared"] / "logs"
    folders = _run_folders(logs, "base-*/*/metrics.json")  # <save_dir>/<W&B run name>/<W&B run id>/
    names = {scale: f.parent.name for scale, f in folders.items()}
    assert names[1.0] != names[3.0] and "fashion_test" not in names.values()
    stamp = r"-\d{8}-\d{6}-\d{3}$"
    assert re.match(r"base-cg1" + stamp, names[1.0]) and re.match(r"base-cg3" + stamp, names[3.0]), names
    for scale, f in folders.items():
        run_file = next((logs / "wandb").glob(f"offline-run-*-{f.name}/run-{f.name}.wandb"))
        data = run_file.read_bytes()
        assert names[scale].encode() in data  # the run's name
        # the whole resolved config (guidances included), as W&B stores config values: JSON
        assert re.search(rb'"guidances":\{"cg":\{[^}]*"scale":' + f"{scale}".encode(), data), scale
        assert re.search(rb'"class_path":"[\w.]*ClassifierGuidance"', data)
        assert b'"evaluation":{"class_path"' in data and b'SamplingDataModule","init_args":{"num_samples":4' in data
    assert not (logs / "metrics.json").exists() and not (logs / "config.yaml").exists()


def test_test_keeps_its_samples_when_asked(runs):
    shared = runs["shared"]
    folders = _run_folders(shared)
    kept, predicted = folders[1.0], shared / "a"  # same config and data as predict_a: the same samples
    with np.load(kept / "samples.npz") as k, np.load(predicted / "samples.npz") as p:
        assert all(np.array_equal(k[name], p[name]) for name in ("arr_0", "arr_1", "seeds", "indices"))
    record, original = (json.loads((f / "samples.json").read_text()) for f in (kept, predicted))
    assert record["command"] == "test" and original["command"] == "predict"
    assert record["config_hash"] == original["config_hash"]
    assert not (kept / "shards").exists()
    assert not (folders[3.0] / "samples.npz").exists()  # not asked


def test_test_in_a_predict_folder_leaves_its_config(runs):
    folder = runs["predicted"]
    assert (folder / "config.yaml").read_text() == "# the predict's config\n"
    assert _config(folder / "test_config.yaml")["data"]["init_args"]["samples"] == str(folder / "samples.npz")
    assert (folder / "metrics.json").is_file()


def test_outputs_are_group_readable(runs):
    written = [p for p in runs["shared"].rglob("*") if p.is_file() and "wandb" not in p.parts]
    assert len(written) > 20
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p  # made under umask 022


# ------------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_of_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        path = atomic_write(tmp_path / "x.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_run_names():
    now = datetime.datetime(2026, 12, 1, 10, 23, 28, 417000)
    guidances = {"cg": {"class_path": "x", "init_args": {"scale": 1.0}}, "tail": {"init_args": {"scale": 0.5}}}
    assert run_name("tail", guidances, now=now) == "tail-cg1+tail0.5-20261201-102328-417"
    assert run_name("unguided", {}, now=now) == "unguided-unguided-20261201-102328-417"
    assert run_name("eval", None, samples="runs/x/n100/samples.npz", now=now) == "eval-samples_n100-20261201-102328-417"


@pytest.mark.parametrize("args, given", [
    (["--trainer.logger=lightning.pytorch.loggers.WandbLogger"], False),
    (["--trainer.logger.name=mine"], True),
    (["--trainer.logger.init_args.name", "mine"], True),
    (["--trainer.logger={class_path: lightning.pytorch.loggers.WandbLogger, init_args: {name: mine}}"], True),
    (["--trainer.logger.project=p"], False),
])
def test_wandb_name_given_on_the_command_line(args, given):
    assert wandb_name_given(args) is given


def test_wandb_name_given_in_a_config_file(tmp_path):
    def logger_file(class_path):
        path = tmp_path / f"{class_path.rsplit('.', 1)[-1]}.yaml"
        path.write_text(yaml.safe_dump({"trainer": {"logger": {"class_path": class_path, "init_args": {"name": "n"}}}}))
        return str(path)

    assert not wandb_name_given(["--config", logger_file("lightning.pytorch.loggers.CSVLogger")])  # carried over
    assert wandb_name_given(["--config", logger_file("lightning.pytorch.loggers.WandbLogger")])


def test_claim_version_skips_taken_folders(tmp_path):
    for n in (0, 1, 4):
        (tmp_path / f"version_{n}").mkdir()
    assert [claim_version(tmp_path) for _ in range(2)] == [5, 6]
    assert claim_version(tmp_path / "new") == 0 and (tmp_path / "new" / "version_0").is_dir()


def test_config_name(tmp_path):
    assert config_name(tmp_path, "test") == "config.yaml"
    (tmp_path / "samples.json").write_text(json.dumps({"config_hash": "x"}))  # a predict's (older: no command)
    assert config_name(tmp_path, "test") == "test_config.yaml" and config_name(tmp_path, "predict") == "config.yaml"
    (tmp_path / "samples.json").write_text(json.dumps({"command": "test"}))
    assert config_name(tmp_path, "test") == "config.yaml"


def test_python_api_hparams_hold_the_guidances():
    from tailgen import ClassifierGuidance, GuidedDiffusion, NetworkSpec

    model = GuidedDiffusion(NetworkSpec(flags=UNET, random_init=True),
                            classifier=NetworkSpec(kind="classifier", flags=CLF, random_init=True),
                            guidances={"cg": ClassifierGuidance(scale=2.0, t_max=0.5)}, progress=False)
    for hparams in (model.hparams, model.hparams_initial):  # hparams_initial is what loggers record
        cg = hparams["guidances"]["cg"]
        assert cg["class_path"] == "tailgen.guidance.classifier.ClassifierGuidance"
        assert cg["init_args"]["scale"] == 2.0 and cg["init_args"]["t_max"] == 0.5
    yaml.safe_dump(model.hparams_initial["guidances"])  # serialisable (NetworkSpec objects are not: pre-existing)
