"""Network calls of a guided run (issue 11): one classifier forward and one backward per step however many
guidances share grad log p(y | x_t); the UNet runs without autograd; the last backward of a step frees the
classifier graph; an objective nobody declared still gets its gradient (by a second forward)."""

import pytest
import torch

from guidance_stubs import SHAPE, LinearClassifier, LinearDenoiser, make_ctx, make_process
from tailgen.diffusion.noise import SeededNoise
from tailgen.guidance import (ClassifierEval, ClassifierGuidance, EntropyScaledClassifierGuidance, GradientGuidance,
                              GuidanceStack, LowDensityGuidance)
from tailgen.guidance.classifier import entropy
from tailgen.sampling import SamplingRun, sample_ddim, sample_ddpm

LABELS = torch.tensor([0, 1, 2, 4])
K = 6


@pytest.fixture
def backwards(monkeypatch):
    """The ``retain_graph`` argument of every ``torch.autograd.grad`` call (one entry per backward)."""
    calls, grad = [], torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("retain_graph"))
        return grad(*args, **kwargs)
    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


class RecordingClassifier(LinearClassifier):
    """Also records whether each input is a leaf (no graph back into the sampler or the UNet)."""

    def __init__(self):
        super().__init__()
        self.leaf_inputs: list[bool] = []

    def __call__(self, x, i):
        self.leaf_inputs.append(x.is_leaf)
        return super().__call__(x, i)


def run(guidances, sampler=sample_ddpm):
    clf, den, grad_mode = RecordingClassifier(), LinearDenoiser(), []

    def denoiser(x, i, labels=None, **kwargs):  # the UNet: records whether autograd is on
        grad_mode.append(torch.is_grad_enabled())
        return den(x, i, labels, **kwargs)
    sampling = SamplingRun(denoiser, guidance=guidances, noisy_classifier=clf, noise=SeededNoise(range(len(LABELS))))
    sampler(sampling, sampling.noise.initial((len(LABELS), *SHAPE)), make_process(K), LABELS)
    return clf, den, grad_mode


@pytest.mark.parametrize("sampler", [sample_ddpm, sample_ddim])
def test_one_forward_and_backward_per_step_for_every_guidance_on_log_p_y(backwards, sampler):
    guidances = [ClassifierGuidance(), ClassifierGuidance(scale=0.5), EntropyScaledClassifierGuidance(scale=0.3),
                 LowDensityGuidance(variant="target"), LowDensityGuidance(variant="negative", scale=0.1)]
    clf, den, grad_mode = run(guidances, sampler)
    assert len(clf.calls) == K and all(clf.leaf_inputs)
    assert backwards == [False] * K  # one backward per step, and it frees the classifier graph
    assert len(den.calls) == K and grad_mode == [False] * K  # one UNet call per step, no graph kept


def test_a_second_objective_costs_one_backward_not_a_forward(backwards):
    clf, den, _ = run([ClassifierGuidance(), LowDensityGuidance(variant="complement", scale=0.2),
                       LowDensityGuidance(variant="target")])
    assert len(clf.calls) == K and len(den.calls) == K
    assert backwards == [True, False] * K  # the step's last declared objective frees the graph


def test_declared_objectives_of_the_active_guidances():
    ctx = make_ctx(torch.zeros(len(LABELS), *SHAPE), i=5, labels=LABELS)
    declared = GuidanceStack([ClassifierGuidance(), EntropyScaledClassifierGuidance(),
                              LowDensityGuidance(variant="entropy"),
                              LowDensityGuidance(variant="complement", t_max=0.1)])
    assert declared.classifier_objectives(ctx) == {"log_p_y", "entropy"}  # complement is outside its window

    class Undeclared(GradientGuidance):
        uses_classifier = True

        def direction(self, ctx):
            return ctx.classifier_eval().grad("custom", lambda e: e.logits[:, 0])
    assert GuidanceStack([ClassifierGuidance(), Undeclared()]).classifier_objectives(ctx) is None
    assert GuidanceStack([]).classifier_objectives(ctx) == frozenset()


def test_an_objective_after_the_freed_graph_reruns_the_forward(backwards):
    clf, x = LinearClassifier(), torch.randn(len(LABELS), *SHAPE, generator=torch.Generator().manual_seed(3))
    ev = ClassifierEval(clf, x, 5, LABELS, objectives=frozenset({"log_p_y"}))
    g_y = ev.grad_log_p_y
    h = ev.grad("entropy", lambda e: entropy(e.log_probs))  # not declared: the graph is gone, so a new forward
    assert len(clf.calls) == 2 and backwards == [False, False]
    torch.testing.assert_close(g_y.double(), clf.grad_log_p(x, LABELS), rtol=1e-5, atol=1e-5)
    kept = ClassifierEval(clf, x, 5, LABELS)  # objectives unknown: the graph is kept for every backward
    torch.testing.assert_close(h, kept.grad("entropy", lambda e: entropy(e.log_probs)), rtol=0, atol=0)
    assert kept.grad_log_p_y is kept.grad_log_p_y and backwards[2:] == [True, True]
