"""Every shipped YAML config parses and validates (types, class paths) without loading any weights; method
configs include their family's base and run on their own; eval overlays parse on top of every method config;
sweep parameters are flags the CLI accepts."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tailgen.cli import main

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p.parent.name not in ("sweeps", "study") and not p.name.startswith("eval"))
OVERLAYS = sorted(ROOT.rglob("eval*.yaml"))
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
SAMPLING = [p for p in CONFIGS if not p.name.startswith("train") and p.name != "base.yaml"]
OTHERS = [p for p in CONFIGS if p not in SAMPLING]  # base and training configs


def print_config(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def resolved(capsys, *args) -> dict:
    return yaml.safe_load(print_config(capsys, *args))


@functools.lru_cache(maxsize=None)
def resolved_with_eval(path: Path) -> dict:
    """`tailgen test --config <method> --config <family>/eval.yaml --print_config`, parsed once per file."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(path), "--config", str(path.parent / "eval.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.mark.parametrize("path", OTHERS, ids=rel)
def test_config_parses(path, capsys):
    subcommand = "fit" if path.name.startswith("train") else "predict"
    assert "class_path" in print_config(capsys, subcommand, "--config", str(path))


@pytest.mark.parametrize("path", SAMPLING, ids=rel)
def test_method_config_is_complete_on_its_own_with_the_eval_overlay(path):
    """`tailgen test --config <method> --config <family>/eval.yaml` parses for every method of every family."""
    cfg = resolved_with_eval(path)
    model = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "tailgen.module.guided.GuidedDiffusion"
    assert model["network"]["init_args"]["preset"]  # from the family's base
    assert model["evaluation"]["init_args"]["metrics"]  # from the overlay
    expected = "default" if path.stem == "default" else path.stem
    assert cfg["writer"]["output_dir"] == f"outputs/{path.parent.name}/{expected}"
    for g in (model["guidances"] or {}).values():
        assert g["class_path"].startswith("tailgen.guidance.")


@pytest.mark.parametrize("family", ["fashion", "imagenet64", "imagenet256"])
def test_method_overlays_compose_their_guidances(family):
    def guidances(name):
        cfg = resolved_with_eval(ROOT / family / f"{name}.yaml")
        return {k: (v["class_path"].rsplit(".", 1)[-1], v["init_args"]["scale"])
                for k, v in (cfg["model"]["init_args"]["guidances"] or {}).items()}, cfg

    unguided, cfg = guidances("unguided")
    assert unguided == {} and cfg["model"]["init_args"]["classifier"] is None
    adm_g, _ = guidances("adm_g")
    tail, _ = guidances("tail")
    tail_x0, _ = guidances("tail_x0")
    assert list(adm_g) == ["cg"] and adm_g["cg"][0] == "ClassifierGuidance"
    assert list(tail_x0) == ["cg", "tail", "x0"] and tail_x0["x0"][0] == "PredictedImagePull"
    if family == "fashion":  # Fashion's adm_g.yaml and tail.yaml are the tail study's picks (tested below)
        return
    assert list(tail) == ["cg", "tail"] and tail["cg"][0] == "ClassifierGuidance"  # ADM-G, then the tail term
    assert tail["cg"] == adm_g["cg"] and tail_x0["tail"] == tail["tail"]


def test_default_is_an_alias_of_tail():
    default = dict(resolved_with_eval(ROOT / "fashion/default.yaml"))
    tail = dict(resolved_with_eval(ROOT / "fashion/tail.yaml"))
    assert default.pop("writer") != tail.pop("writer")
    assert default == tail


def test_includes_are_relative_to_the_file_and_dotted_keys_merge(tmp_path, capsys, monkeypatch):
    """The two jsonargparse rules configs/README.md relies on (a jsonargparse upgrade that changes them fails here)."""
    monkeypatch.chdir(tmp_path)  # not the repository root: the include must resolve against the file
    (tmp_path / "sub").mkdir()
    overlay = tmp_path / "sub" / "mine.yaml"
    overlay.write_text(f"config: {os.path.relpath(ROOT / 'fashion/adm_g.yaml', overlay.parent)}\n"
                       "model.init_args.sampler: ddim\nmodel.init_args.guidances.cg.init_args.scale: 3.0\n")
    cfg = resolved(capsys, "predict", "--config", str(overlay))
    model = cfg["model"]["init_args"]
    assert model["sampler"] == "ddim" and model["guidances"]["cg"]["init_args"]["scale"] == 3.0
    assert model["network"]["init_args"]["preset"] == "fashion_diffusion"  # kept from base.yaml
    # a dotted key into a network spec (a class) goes through its init_args, and keeps the preset
    overlay.write_text(f"config: {os.path.relpath(ROOT / 'fashion/adm_g.yaml', overlay.parent)}\n"
                       "model.init_args.network.init_args.checkpoint: other.pt\n")
    network = resolved(capsys, "predict", "--config", str(overlay))["model"]["init_args"]["network"]["init_args"]
    assert (network["preset"], network["checkpoint"]) == ("fashion_diffusion", "other.pt")
    # A nested block after `config:` in the same file replaces the section (documented; why overlays use dots)
    overlay.write_text(f"config: {os.path.relpath(ROOT / 'fashion/adm_g.yaml', overlay.parent)}\n"
                       "model:\n  class_path: tailgen.module.guided.GuidedDiffusion\n  init_args: {sampler: ddim}\n")
    assert resolved(capsys, "predict", "--config", str(overlay))["model"]["init_args"]["network"] is None


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_parameters_are_cli_flags(path, capsys):
    sweep = yaml.safe_load(path.read_text())
    configs = [sweep["command"][i + 1] for i, a in enumerate(sweep["command"]) if a == "--config"]
    flags = [f"--{key}={spec['values'][-1]}" for key, spec in sweep["parameters"].items() if "values" in spec]
    repo = ROOT.parent
    printed = print_config(capsys, "test", *[x for c in configs for x in ("--config", str(repo / c))], *flags)
    for key, spec in sweep["parameters"].items():
        if "values" not in spec:
            continue
        node = yaml.safe_load(printed)
        for part in key.split("."):
            node = node[part]
        assert node == spec["values"][-1], key


@functools.cache
def _study_selections() -> tuple[dict, ...]:
    """The tail study's selection.json of the final model, then of the screening model (docs/tail_study/model_<sha>/,
    written by `python tools/tail_study.py report`)."""
    sys.path.insert(0, str(ROOT.parent / "tools"))
    import tail_study

    docs = [tail_study.study_folders(tail_study.load_plan(str(ROOT / "study" / plan)))["docs"]
            for plan in ("fashion_tail.yaml", "fashion_tail_5epoch.yaml")]
    return tuple(json.loads((folder / "selection.json").read_text()) for folder in docs)


def _study_pick(group: str) -> dict:
    """The study's pick of ``group``: the final model's once it has one; until then the screening model's
    (PROTOCOL.md, session 9)."""
    selection = next((s for s in _study_selections() if group in s), {})
    assert group in selection, f"the study has picked no {group} configuration yet"
    return selection[group]


def _same_guidances(config: Path, picked: dict) -> None:
    resolved = resolved_with_eval(config)["model"]["init_args"]["guidances"]
    assert list(resolved) == list(picked)
    for name, spec in picked.items():
        assert resolved[name]["class_path"] == spec["class_path"]
        for arg, value in spec.get("init_args", {}).items():
            assert resolved[name]["init_args"][arg] == value, (name, arg)


def test_fashion_tail_is_the_tail_study_pick():
    """configs/fashion/tail.yaml is the guidance stack the tail study's PROTOCOL.md rule picked: same guidances,
    classes and knob values."""
    _same_guidances(ROOT / "fashion/tail.yaml", _study_pick("tail")["guidances"])


def test_fashion_competitor_config_is_the_study_pick():
    """The best competitor ships at the strength the study picked: configs/fashion/<method>.yaml (its method's named
    config) holds the same guidance stack as the pick (e.g. interval@4 -> interval.yaml at scale 4)."""
    picked = _study_pick("competitor")
    config = ROOT / "fashion" / f"{picked['run'].split('@')[0]}.yaml"
    assert config.exists(), f"the study's best competitor {picked['run']} has no named config {config.name}"
    _same_guidances(config, picked["guidances"])


def test_fashion_adm_g_is_the_study_scale_with_the_lowest_fid():
    """configs/fashion/adm_g.yaml is ADM-G at the guided scale with the lowest domain FID in the study's grid."""
    _same_guidances(ROOT / "fashion/adm_g.yaml", _study_pick("adm_g")["guidances"])
