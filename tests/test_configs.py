"""Every shipped YAML config parses and validates (types, class paths) without loading any weights; eval
overlays parse on top of their sampling config; sweep parameters are flags the CLI accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tailgen.cli import main

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p.parent.name != "sweeps" and not p.name.startswith("eval"))
OVERLAYS = sorted(ROOT.rglob("eval*.yaml"))
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def print_config(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(path, capsys):
    subcommand = "fit" if path.name.startswith("train") else "predict"
    assert "class_path" in print_config(capsys, subcommand, "--config", str(path))


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: str(p.relative_to(ROOT)))
def test_eval_overlay_parses_on_its_sampling_config(path, capsys):
    base = path.parent / "default.yaml"
    printed = yaml.safe_load(print_config(capsys, "test", "--config", str(base), "--config", str(path)))
    assert printed["model"]["init_args"]["evaluation"]["init_args"]["metrics"]
    assert printed["model"]["init_args"]["guidances"]  # the overlay did not replace the sampling config


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_parameters_are_cli_flags(path, capsys):
    sweep = yaml.safe_load(path.read_text())
    configs = [sweep["command"][i + 1] for i, a in enumerate(sweep["command"]) if a == "--config"]
    flags = [f"--{key}={spec['values'][-1]}" for key, spec in sweep["parameters"].items()]
    repo = ROOT.parent
    printed = print_config(capsys, "test", *[x for c in configs for x in ("--config", str(repo / c))], *flags)
    for key, spec in sweep["parameters"].items():
        node = yaml.safe_load(printed)
        for part in key.split("."):
            node = node[part]
        assert node == spec["values"][-1], key
