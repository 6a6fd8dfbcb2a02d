"""The stack with the plug-ins: hook order, gating (window, every, schedule), YAML construction, a user guidance."""

import json
import math

import pytest
import torch
from jsonargparse import ArgumentParser

from guidance_stubs import LinearClassifier, LinearDenoiser, batch, make_ctx, make_process
from tailgen.guidance import (
    ClassifierFreeGuidance, ClassifierGuidance, EntropyScaledClassifierGuidance, GradientGuidance, Guidance,
    GuidanceStack, LowDensityGuidance, PredictedImageGradient, PredictedImagePull,
)
from user_guidance import Sharpen

LABELS = torch.tensor([0, 1, 2, 3])


class Recorder(Guidance):
    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self._log = name, log

    def _rec(self, hook, value):
        self._log.append(f"{hook}:{self.name}")
        return value

    def before_model(self, ctx, x, w):
        return self._rec("before_model", x)

    def guide_eps(self, ctx, eps, w):
        return self._rec("guide_eps", eps)

    def guide_x0(self, ctx, x0, w):
        return self._rec("guide_x0", x0)

    def after_step(self, ctx, x_prev, w):
        return self._rec("after_step", x_prev)


class RecordingGradient(GradientGuidance):
    def __init__(self, form: str, log: list):
        super().__init__(form=form)
        self._log = log

    def direction(self, ctx):
        self._log.append(f"gradient:{self.form}")
        return torch.zeros_like(ctx.x)


def test_hooks_run_in_the_stated_order():
    log = []
    den = LinearDenoiser()
    network = lambda x, i, labels: (log.append("network"), den(x, i, labels))[1]
    gs = [Recorder("A", log), RecordingGradient("score", log), RecordingGradient("pre", log), Recorder("B", log),
          RecordingGradient("mean", log)]
    stack = GuidanceStack(gs)
    ctx = make_ctx(batch(), labels=LABELS, denoiser=network, sampler="ddpm")
    stack.predict(ctx)
    stack.mean_gradient(ctx)
    stack.after_step(ctx, batch())
    assert log == ["before_model:A", "before_model:B", "gradient:pre", "network", "guide_eps:A", "guide_eps:B",
                   "gradient:score", "guide_x0:A", "guide_x0:B", "gradient:mean", "after_step:A", "after_step:B"]


def test_time_window():
    process = make_process(10)
    g = ClassifierGuidance(t_min=0.3, t_max=0.6)
    stack = GuidanceStack([g])
    seen = []
    for i in range(10):
        ctx = make_ctx(batch(), i=i, process=process, labels=LABELS, noisy_classifier=LinearClassifier())
        assert g.active(ctx) == (0.3 <= ctx.tau <= 0.6)
        assert (stack.mean_gradient(ctx) is not None) == g.active(ctx)
        seen.append(g.active(ctx))
    assert any(seen) and not all(seen)


def test_every_k_steps():
    process = make_process(10)
    g = PredictedImagePull("pull", scale=0.1, every=3)
    active = [g.active(make_ctx(batch(), i=9 - k, process=process)) for k in range(10)]
    assert active == [k % 3 == 0 for k in range(10)]


@pytest.mark.parametrize("schedule,f", [
    ("constant", lambda tau: 1.0), ("high_noise", lambda tau: tau), ("low_noise", lambda tau: 1 - tau),
    ("middle", lambda tau: math.sin(math.pi * tau)),
])
def test_schedule_weights_the_gradient(schedule, f):
    clf, x = LinearClassifier(), batch()
    ctx = make_ctx(x, i=4, labels=LABELS, noisy_classifier=clf)
    g = LowDensityGuidance(variant="negative", scale=2.0, schedule=schedule)
    assert g.weight(ctx) == pytest.approx(2.0 * f(ctx.tau))
    torch.testing.assert_close(g.guided_gradient(ctx).double(), -2.0 * f(ctx.tau) * clf.grad_log_p(x, LABELS),
                               rtol=1e-5, atol=1e-6)


def test_user_guidance_runs_in_the_stack():
    g = Sharpen(scale=0.5, kernel=3)
    assert repr(g).startswith("Sharpen(") and "kernel=3" in repr(g)
    early = make_ctx(batch(), i=9, labels=LABELS)  # tau ~ 1 > t_max: inactive
    late = make_ctx(batch(), i=1, labels=LABELS)
    plain = GuidanceStack([]).predict(make_ctx(batch(), i=1, labels=LABELS))
    assert not g.active(early) and g.active(late)
    sharp = GuidanceStack([g]).predict(late)
    assert not torch.equal(sharp.x0, plain.x0) and sharp.x0.abs().max() <= 1
    with pytest.raises(Exception, match="odd"):
        Sharpen(kernel=2)


def test_every_guidance_builds_from_yaml_with_class_path():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--guidances", type=dict[str, Guidance])
    config = {
        "adm": {"class_path": "tailgen.guidance.ClassifierGuidance", "init_args": {"scale": 1.0}},
        "eds": {"class_path": "tailgen.guidance.EntropyScaledClassifierGuidance", "init_args": {"scale": 0.75}},
        "cfg": {"class_path": "tailgen.guidance.ClassifierFreeGuidance", "init_args": {"scale": 0.3, "null_label": 10}},
        "tail": {"class_path": "tailgen.guidance.LowDensityGuidance",
                 "init_args": {"variant": "complement", "lam": 0.5, "max_norm": 0.1, "t_min": 0.2}},
        "x0": {"class_path": "tailgen.guidance.PredictedImagePull", "init_args": {"variant": "renoise", "scale": 0.02}},
        "x0grad": {"class_path": "tailgen.guidance.PredictedImageGradient", "init_args": {"objective": "norm"}},
        "user": {"class_path": "user_guidance.Sharpen", "init_args": {"kernel": 5}},
    }
    cfg = parser.parse_args(["--guidances", json.dumps(config)])
    built = parser.instantiate(cfg).guidances
    kinds = [ClassifierGuidance, EntropyScaledClassifierGuidance, ClassifierFreeGuidance, LowDensityGuidance,
             PredictedImagePull, PredictedImageGradient, Sharpen]
    assert [type(g) for g in built.values()] == kinds
    assert built["tail"].lam == 0.5 and built["tail"].max_norm == 0.1 and built["x0"].scale == 0.02
    assert built["cfg"].null_label == 10 and built["user"].kernel == 5
    bad = {"tail": {"class_path": "tailgen.guidance.LowDensityGuidance", "init_args": {"variant": "bogus"}}}
    with pytest.raises(Exception, match="complement"):
        parser.parse_args(["--guidances", json.dumps(bad)])
