"""One vocabulary for every guidance: the strength is ``scale``; the window (t_min/t_max, or diffusers'
start/stop fractions of the run), ``every`` and ``schedule`` live on the base class and reach YAML and the
command line for any subclass that forwards ``**kwargs`` to ``super().__init__``."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from guidance_stubs import batch, make_ctx, make_process

import tailgen.guidance as tg
from tailgen.cli import main
from tailgen.guidance import ClassifierGuidance, Guidance, PredictedImagePull
from tailgen.utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE_KNOBS = ("scale", "t_min", "t_max", "every", "schedule", "start", "stop")


def active_steps(g: Guidance, num_steps: int = 10) -> list[int]:
    process = make_process(num_steps)
    return [k for k in range(num_steps) if g.active(make_ctx(batch(), i=num_steps - 1 - k, process=process))]


@pytest.mark.parametrize("start, stop, want", [
    (0.0, 1.0, list(range(10))),
    (0.2, 0.5, [2, 3, 4]),          # diffusers: int(start K) <= k < int(stop K)
    (0.0, 0.35, [0, 1, 2]),
    (0.75, 1.0, [7, 8, 9]),
])
def test_start_stop_are_fractions_of_the_run(start, stop, want):
    assert active_steps(ClassifierGuidance(start=start, stop=stop)) == want


def test_start_stop_and_t_window_gate_together():
    by_t = active_steps(ClassifierGuidance(t_max=0.5))
    by_run = active_steps(ClassifierGuidance(start=0.5))
    both = active_steps(ClassifierGuidance(t_max=0.5, start=0.7, every=2))
    assert by_t and by_run and both == [k for k in by_t if k >= 7 and k % 2 == 0]
    # the documented correspondence on a uniformly respaced run: start ~ 1 - t_max
    assert abs(len(by_t) - len(by_run)) <= 1


@pytest.mark.parametrize("kwargs, word", [
    ({"start": 0.5, "stop": 0.5}, "start < stop"), ({"stop": 1.5}, "start < stop"), ({"start": -0.1}, "start"),
])
def test_bad_start_stop(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        PredictedImagePull(**kwargs)


def builtin_guidances() -> list[type]:
    return [cls for name in tg.__all__ if isinstance(cls := getattr(tg, name), type) and issubclass(cls, Guidance)
            and cls is not Guidance]


@pytest.mark.parametrize("cls", builtin_guidances(), ids=lambda c: c.__name__)
def test_every_builtin_guidance_calls_its_strength_scale_and_exposes_every_base_knob(cls):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "g")
    defaults = parser.get_defaults().g
    for knob in BASE_KNOBS:  # what YAML / the CLI / sweeps can set
        assert knob in defaults, f"{cls.__name__} hides {knob}: forward **kwargs to super().__init__"
    assert "eta" not in inspect.signature(cls).parameters and "eta" not in defaults
    required = [p for p in inspect.signature(cls).parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if not required:
        assert not hasattr(cls(), "eta")


USER_MODULE = '''
from tailgen.guidance import Guidance

class Blur(Guidance):
    """A user's guidance that declares only its own argument and forwards the rest."""

    def __init__(self, radius: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.radius = radius
'''


def test_user_subclass_with_kwargs_exposes_the_inherited_knobs(tmp_path, capsys, monkeypatch):
    """A subclass declaring only `radius` plus **kwargs gets t_min, every, ... from YAML and the command line
    (jsonargparse follows **kwargs into Guidance.__init__)."""
    monkeypatch.chdir(tmp_path)  # the CLI puts the working directory on sys.path, as for a real user
    (tmp_path / "my_guidances.py").write_text(USER_MODULE)
    overlay = tmp_path / "mine.yaml"
    overlay.write_text(f"config: {ROOT / 'configs/fashion/unguided.yaml'}\n"
                       "model.init_args.guidances:\n  blur:\n    class_path: my_guidances.Blur\n"
                       "    init_args: {radius: 2, t_min: 0.3, stop: 0.8}\n")
    with pytest.raises(SystemExit):
        main(["predict", "--config", str(overlay), "--model.init_args.guidances.blur.init_args.every=2",
              "--model.init_args.guidances.blur.init_args.scale=0.4", "--print_config"])
    blur = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["guidances"]["blur"]
    assert blur["class_path"] == "my_guidances.Blur"
    assert blur["init_args"] == {"radius": 2, "scale": 0.4, "t_min": 0.3, "t_max": 1.0, "every": 2,
                                 "schedule": "constant", "start": 0.0, "stop": 0.8}
    # a knob the class does not have is still an error naming it
    with pytest.raises(SystemExit):
        main(["predict", "--config", str(overlay), "--model.init_args.guidances.blur.init_args.eta=0.1",
              "--print_config"])
    assert "eta" in capsys.readouterr().err
    # and the instantiated object carries them
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--g", type=Guidance)
    g = parser.instantiate(parser.parse_args(
        ["--g", '{"class_path": "my_guidances.Blur", "init_args": {"radius": 3, "t_max": 0.6, "every": 3}}'])).g
    assert (g.radius, g.t_max, g.every, g.scale) == (3, 0.6, 3, 1.0)


def test_readme_guidance_example_is_the_tested_one():
    """README's "Writing your own guidance" shows tests/user_guidance.py's signature (the one the tests load)."""
    from user_guidance import Sharpen

    readme = (ROOT / "README.md").read_text()
    assert f"    def __init__{inspect.signature(Sharpen.__init__)}:".replace("'", "") in readme.replace("'", "")
    assert "super().__init__(scale=scale, t_max=t_max, **kwargs)" in readme
