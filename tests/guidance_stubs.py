"""Analytic stand-ins for the networks, for the guidance tests: closed-form gradients, no real networks.

* ``LinearClassifier``: logits = W x.flatten() + b, so grad_x log p(y|x) = W_y - sum_c p_c W_c.
* ``two_class_at(q)``: a 2-class linear classifier and a point where p(y=0|x) = q exactly (p is controllable).
* ``LinearDenoiser``: eps = a x + shift[label], so x0_hat = c x - d shift with closed-form c, d.
* ``CountingGuidance``: ADM classifier guidance that counts its ``validate`` calls (when the stack is checked).
"""

from __future__ import annotations

import math

import torch

from tailgen.diffusion import DiffusionProcess, Prediction
from tailgen.guidance import ClassifierGuidance, StepContext

SHAPE = (3, 2, 2)  # tiny images: D = 12


def make_process(steps: int = 10) -> DiffusionProcess:
    return DiffusionProcess.from_flags(diffusion_steps=1000, noise_schedule="cosine", timestep_respacing=str(steps))


class LinearClassifier:
    """(x, i) -> logits = W x.flatten(1) + b (i ignored but recorded)."""

    def __init__(self, num_classes: int = 5, dim: int = 12, seed: int = 0, W=None, b=None):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) if W is None else W.double()
        self.b = torch.randn(num_classes, generator=g, dtype=torch.float64) if b is None else b.double()
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        self.calls.append(int(i))
        return x.flatten(1) @ self.W.to(x.dtype).T + self.b.to(x.dtype)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.double().flatten(1) @ self.W.T + self.b, -1)

    def grad_log_p(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Closed form grad_x log p(y | x) = W_y - p @ W (float64)."""
        return (self.W[y] - self.probs(x) @ self.W).reshape(x.shape)


def two_class_at(q: float, shape=SHAPE, gain: float = 3.0):
    """A 2-class classifier (logits [w.x, 0]) and x with p(y=0 | x) = q: returns (classifier, x [1, *shape])."""
    dim = math.prod(shape)
    w = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64) * gain
    clf = LinearClassifier(W=torch.stack([w, torch.zeros(dim, dtype=torch.float64)]), b=torch.zeros(2))
    x = (math.log(q / (1 - q)) / w.dot(w)) * w  # w.x = logit(q)
    return clf, x.reshape(1, *shape).float()


class LinearDenoiser:
    """(x, i, labels) -> Prediction(eps = a x + shift[labels]); records the labels of every call."""

    def __init__(self, a: float = 0.3, num_labels: int = 6, seed: int = 1, log_var: float | None = None):
        g = torch.Generator().manual_seed(seed)
        self.a, self.shift = a, 0.1 * torch.randn(num_labels, *SHAPE, generator=g)
        self.log_var = log_var
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def __call__(self, x: torch.Tensor, i: int, labels: torch.Tensor | None = None) -> Prediction:
        self.calls.append((int(i), None if labels is None else labels.clone()))
        eps = self.a * x + (0 if labels is None else self.shift[labels].to(x))
        log_var = None if self.log_var is None else torch.full_like(x, self.log_var)
        return Prediction(eps=eps, log_var=log_var)


def make_ctx(x, i=5, *, process=None, labels=None, noisy_classifier=None, denoiser=None, uncond=None, noise=None,
             sampler="ddpm", step=None) -> StepContext:
    process = process or make_process()
    K = process.num_steps
    return StepContext(step=K - 1 - i if step is None else step, num_steps=K, i=i, process=process, x=x,
                       labels=labels, sampler=sampler, denoiser=denoiser or LinearDenoiser(), uncond=uncond,
                       noisy_classifier=noisy_classifier, noise=noise)


def batch(n: int = 4, seed: int = 2, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


class CountingGuidance(ClassifierGuidance):
    """``ClassifierGuidance`` that counts its ``validate`` calls in ``validations``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.validations = 0

    def validate(self, **kwargs):
        self.validations += 1
        super().validate(**kwargs)
