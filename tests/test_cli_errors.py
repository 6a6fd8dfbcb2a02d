"""Bad-input matrix: every case runs the ``tailgen`` command line in a process of its own and must end with a
non-zero exit, exactly one ``tailgen: error:`` line naming the problem, no Python traceback, and no samples.npz /
metrics.json left behind.

The cases run through ``tests/cli_runner.py`` (tailgen imported once, one forked process per case, two at a
time) and two of them through the installed ``tailgen`` console script, so the whole matrix costs about one
import plus the cases' own work. Networks are tiny ADM UNets / classifiers generated here (random weights saved
as files), except the extreme-guidance cases, which use the shipped Fashion-MNIST models as the issue reports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cli_processes import tailgen_env
from tailgen.models.adm import create_classifier, create_model

REPO = Path(__file__).resolve().parents[1]
UNET = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8", num_head_channels=32,
            learn_sigma=True, class_cond=True, num_classes=10)
CLF = dict(image_size=16, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8",
           classifier_channel_mult="1,2", num_classes=10)
CLF32 = {**CLF, "image_size": 32}


@dataclass
class Case:
    name: str
    argv: list[str]  # "{kit}" is replaced by the fixture folder
    keywords: list[str]  # each must appear in the error line (case-insensitive)
    overlay: dict | None = None  # written to overlay.yaml and appended as --config
    env: dict = field(default_factory=dict)
    script: bool = False  # run through the installed `tailgen` console script instead of the runner


P = ["predict", "--config", "{kit}/base.yaml"]
T = ["test", "--config", "{kit}/base.yaml", "--config", "{kit}/eval.yaml"]
NET = "--model.init_args.network"
CG = "--model.init_args.guidances.cg.init_args.scale"
DATA = "--data.init_args"
FASHION = ["predict", "--config", str(REPO / "configs/fashion/adm_g.yaml"), "--writer.output_dir=out",
           "--model.init_args.diffusion.timestep_respacing=10", f"{DATA}.num_samples=4", f"{DATA}.batch_size=4",
           "--model.init_args.progress=false", "--trainer.enable_progress_bar=false", f"{CG}=1e6"]

CASES = [
    # weights files
    Case("ckpt_missing", [*P, f"{NET}.checkpoint={{kit}}/nope.pt"], ["model.init_args.network.checkpoint", "not found", "nope.pt"]),
    Case("feature_network_ckpt_missing", [*T, "--model.init_args.evaluation.feature_network.checkpoint={kit}/nope.pt"],
         ["model.init_args.evaluation.feature_network.checkpoint", "not found", "nope.pt"]),
    Case("ckpt_directory", [*P, f"{NET}.checkpoint={{kit}}"], ["is a directory"]),
    Case("ckpt_empty", [*P, f"{NET}.checkpoint={{kit}}/empty.pt"], ["empty.pt", "0 bytes"]),
    Case("ckpt_truncated", [*P, f"{NET}.checkpoint={{kit}}/truncated.pt"], ["truncated.pt", "truncated"]),
    Case("ckpt_random_bytes", [*P, f"{NET}.checkpoint={{kit}}/random.pt"], ["random.pt", "not a pytorch"]),
    Case("ckpt_code", [*P, f"{NET}.checkpoint={{kit}}/code.pt"], ["code.pt", "pickled python objects"]),
    Case("ckpt_safetensors", [*P, f"{NET}.checkpoint={{kit}}/weights.safetensors"], ["safetensors"]),
    Case("ckpt_wrong_architecture", [*P, f"{NET}.checkpoint={{kit}}/clf.pt"], ["does not fit", "classifier"]),
    Case("unknown_preset", [*P, f"{NET}.preset=64x64"], ["64x64", "64x64_diffusion"]),
    Case("official_preset_without_checkpoint", [*P, f"{NET}.preset=64x64_diffusion", f"{NET}.checkpoint=null"],
         ["model.init_args.network.checkpoint", "64x64_diffusion", "random_init"], script=True),
    Case("flags_without_checkpoint", [*P, f"{NET}.checkpoint=null"], ["model.init_args.network.checkpoint"]),
    Case("classifier_without_checkpoint", [*P, "--model.init_args.classifier.checkpoint=null"],
         ["model.init_args.classifier.checkpoint"]),
    Case("resolution_mismatch", [*P, "--model.init_args.classifier.flags.image_size=32",
                                 "--model.init_args.classifier.checkpoint={kit}/clf32.pt"], ["32x32", "16x16", "model.init_args.classifier"]),
    # guidances and types
    Case("unknown_guidance", P, ["tailgen.guidance.NoSuchGuidance"],
         overlay={"model": {"init_args": {"guidances": {"x": {"class_path": "tailgen.guidance.NoSuchGuidance"}}}}}),
    Case("guidance_name_typo", [*P, "--model.init_args.guidances.gc.init_args.scale=0.3"],
         ["guidances.gc", "configured: cg", "class_path"]),
    Case("guidance_name_typo_fashion", ["predict", "--config", str(REPO / "configs/fashion/tail.yaml"),
                                        "--model.init_args.guidances.tial.init_args.scale=0.3"],
         ["'tial'", "configured: x0"], script=True),
    Case("base_guidance_class", P, ["guidances.x", "base class", "no hooks"],
         overlay={"model": {"init_args": {"guidances": {"x": {"class_path": "tailgen.guidance.Guidance",
                                                              "init_args": {"scale": 1.0}}}}}}),
    Case("wrong_type_scale", [*P, f"{CG}=strong"], ["scale", "strong"]),
    Case("nan_scale", [*P, f"{CG}=.nan"], ["scale", "finite"]),
    Case("inf_scale", [*P, f"{CG}=.inf"], ["scale", "finite"]),
    Case("cg_without_classifier", [*P, "--model.init_args.classifier=null"], ["needs a noisy classifier"]),
    Case("unknown_sampler", [*P, "--model.init_args.sampler=euler"], ["sampler", "euler"]),
    Case("label_out_of_range", P, ["label 12", "out of range", "0..9"], overlay={"data": {"init_args": {"labels": 12}}}),
    Case("labels_wrong_type", P, ["data.labels", "expected one of", "list[int]"],
         overlay={"data": {"init_args": {"labels": ["shirt", "bag"]}}}),
    Case("bad_respacing_ddim", [*P, "--model.init_args.diffusion.timestep_respacing=ddim2000"],
         ["ddim2000", "ddim1000"]),
    Case("bad_respacing_word", [*P, "--model.init_args.diffusion.timestep_respacing=fast"], ["fast"]),
    Case("num_samples_zero", [*P, f"{DATA}.num_samples=0"], ["num_samples", ">= 1"]),
    Case("num_samples_negative", [*P, f"{DATA}.num_samples=-5"], ["num_samples", "-5"]),
    # config files and subcommands
    Case("yaml_syntax_error", ["predict", "--config", "{kit}/broken.yaml"], ["broken.yaml", "line 4", "column 6"],
         script=True),
    Case("config_missing", ["predict", "--config", "{kit}/nope.yaml"], ["nope.yaml"]),
    Case("fit_with_predict_config", ["fit", "--config", "{kit}/base.yaml"], ["tailgen fit", "tailgen predict"]),
    # degenerate samples (shipped Fashion models, as in the issue)
    Case("extreme_guidance_clip", FASHION, ["degenerate", "'cg'", "step"]),
    Case("extreme_guidance_noclip", [*FASHION, "--model.init_args.clip_denoised=false"],
         ["degenerate", "'cg'", "step"]),
    # tailgen test: samples files, reference data, feature networks
    Case("samples_missing", [*T, f"{DATA}.samples={{kit}}/none.npz"], ["none.npz", "does not exist"]),
    Case("samples_truncated", [*T, f"{DATA}.samples={{kit}}/samples_truncated.npz"], ["samples_truncated.npz", "truncated or corrupt"]),
    Case("samples_random_bytes", [*T, f"{DATA}.samples={{kit}}/samples_random.npz"], ["samples_random.npz", "not an .npz"]),
    Case("samples_wrong_size", [*T, f"{DATA}.samples={{kit}}/samples_64.npz"], ["64x64x3", "16x16x3", "evaluation.reference"]),
    Case("samples_short_labels", [*T, f"{DATA}.samples={{kit}}/samples_short_labels.npz"], ["arr_1", "4 images"]),
    Case("samples_float", [*T, f"{DATA}.samples={{kit}}/samples_float.npz"], ["uint8"]),
    Case("sampled_size_differs_from_reference", [*T, "--model.init_args.evaluation.reference={kit}/ref8.npz"],
         ["16x16x3", "8x8x3", "evaluation.reference"]),
    Case("reference_corrupt", [*T, "--model.init_args.evaluation.reference={kit}/ref_corrupt.npz"],
         ["ref_corrupt.npz", "not an .npz"]),
    Case("missing_fashion_mnist", [*T, "--model.init_args.evaluation.reference=fashion_mnist:test"],
         ["fashion-mnist", "TAILGEN_FASHION_MNIST"], env={"TAILGEN_FASHION_MNIST": "{kit}/empty_dir"}),
    Case("missing_inception_weights", [*T, "--model.init_args.evaluation.features=inception",
                                       "--model.init_args.evaluation.inception_weights={kit}/none.pth"],
         ["evaluation.inception_weights", "none.pth"]),
    Case("test_without_evaluation", ["test", "--config", "{kit}/base.yaml"], ["model.evaluation"]),
]


def _save(path: Path, obj) -> None:
    torch.save(obj, path)


def _npz(path: Path, **arrays) -> Path:
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def new_kit(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A fresh folder ``<name>`` for a test module's cases and its ``kit`` (see :func:`make_kit`) inside it."""
    root = tmp_path_factory.mktemp(name)
    kit = root / "kit"
    kit.mkdir()
    make_kit(kit)
    return root, kit


def make_kit(kit: Path) -> None:
    """Weights files (good and bad), configs and samples / reference files for the cases."""
    torch.manual_seed(0)
    unet, clf, clf32 = create_model(**UNET), create_classifier(**CLF), create_classifier(**CLF32)
    _save(kit / "unet.pt", unet.state_dict())
    _save(kit / "clf.pt", clf.state_dict())
    _save(kit / "clf32.pt", clf32.state_dict())
    good = (kit / "unet.pt").read_bytes()
    (kit / "empty.pt").write_bytes(b"")
    (kit / "truncated.pt").write_bytes(good[: len(good) // 2])
    (kit / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    # a checkpoint carrying pickled objects besides tensors (unpickling it could run code)
    _save(kit / "code.pt", {"state_dict": unet.state_dict(), "config": argparse.Namespace(lr=1)})
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (kit / "weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    (kit / "empty_dir").mkdir()
    (kit / "broken.yaml").write_text("model:\n  init_args:\n    sampler: [ddpm\n  foo: 1\n")

    model = {"network": {"flags": UNET, "checkpoint": str(kit / "unet.pt")},
             "classifier": {"kind": "classifier", "flags": CLF, "checkpoint": str(kit / "clf.pt")},
             "diffusion": {"timestep_respacing": "3"}, "sampler": "ddpm", "progress": False,
             "guidances": {"cg": {"class_path": "tailgen.guidance.ClassifierGuidance", "init_args": {"scale": 1.0}}}}
    base = {"seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "default_root_dir": "."},
            "model": {"class_path": "tailgen.module.guided.GuidedDiffusion", "init_args": model},
            "data": {"class_path": "tailgen.module.sampling_data.SamplingDataModule",
                     "init_args": {"num_samples": 4, "batch_size": 4, "seed": 0, "labels": "balanced"}},
            "writer": {"output_dir": "out"}}
    (kit / "base.yaml").write_text(yaml.safe_dump(base))
    evaluation = {"metrics": ["fid"], "features": "classifier",
                  "feature_network": {"kind": "classifier", "flags": CLF, "checkpoint": str(kit / "clf.pt")},
                  "reference": str(kit / "ref.npz"), "cache_dir": "cache", "output": "metrics.json"}
    (kit / "eval.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"evaluation": evaluation}}}))

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(4) % 10
    _npz(kit / "ref.npz", arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), arr_1=np.arange(8) % 10)
    _npz(kit / "ref8.npz", arr_0=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    (kit / "ref_corrupt.npz").write_bytes(rng.bytes(2000))
    good = _npz(kit / "samples.npz", arr_0=images, arr_1=labels).read_bytes()
    (kit / "samples_truncated.npz").write_bytes(good[: len(good) // 2])
    (kit / "samples_random.npz").write_bytes(rng.bytes(3000))
    _npz(kit / "samples_64.npz", arr_0=rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), arr_1=labels)
    _npz(kit / "samples_short_labels.npz", arr_0=images, arr_1=labels[:3])
    _npz(kit / "samples_float.npz", arr_0=images.astype(np.float32), arr_1=labels)


def _fill(value, kit: Path):
    if isinstance(value, str):
        return value.replace("{kit}", str(kit))
    if isinstance(value, list):
        return [_fill(v, kit) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, kit) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every case once (two at a time); returns name -> (exit status, stderr, case folder)."""
    root, kit = new_kit(tmp_path_factory, "cli_errors")
    env = tailgen_env()
    runner_cases, scripts = [], {}
    for case in CASES:
        folder = root / case.name
        folder.mkdir()
        argv = _fill(case.argv, kit)
        if case.overlay is not None:
            (folder / "overlay.yaml").write_text(yaml.safe_dump(case.overlay))
            argv = [*argv, "--config", str(folder / "overlay.yaml")]
        if case.script:
            tailgen = shutil.which("tailgen", path=str(Path(sys.executable).parent)) or "tailgen"
            scripts[case.name] = subprocess.Popen(
                [tailgen, *argv], cwd=folder, env={**env, **_fill(case.env, kit)}, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        else:
            runner_cases.append({"argv": argv, "cwd": str(folder), "env": _fill(case.env, kit),
                                 "out": str(folder / ".result")})
    (root / "cases.json").write_text(json.dumps(runner_cases))
    subprocess.run([sys.executable, str(REPO / "tests/cli_runner.py"), str(root / "cases.json"), "2"],
                   env=env, check=True, timeout=900)
    out = {}
    for case in CASES:
        folder = root / case.name
        if case.script:
            _, stderr = scripts[case.name].communicate(timeout=300)
            out[case.name] = (scripts[case.name].returncode, stderr, folder)
        else:
            result = folder / ".result"
            out[case.name] = (int((result / "rc").read_text()), (result / "stderr").read_text(), folder)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_error(results, case):
    rc, stderr, folder = results[case.name]
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("tailgen: error:")]
    assert len(lines) == 1, stderr
    assert rc == 2, (rc, stderr)
    for word in case.keywords:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    written = [p.name for p in folder.rglob("*") if p.name in ("samples.npz", "metrics.json")]
    assert not written, written


def test_matrix_size():
    assert len(CASES) >= 30
