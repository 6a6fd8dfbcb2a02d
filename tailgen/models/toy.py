"""Tiny MLPs for the 2-D toy mixture, with the ADM networks' call signatures.

* :class:`ToyDenoiser` ``net(x, t, y=None, class_emb=None) -> (B, out)``: class-conditional eps prediction (out = 2,
  or 4 with ``learn_sigma`` as ADM: eps then the variance interpolation v). ``t`` are original 0..T-1 indices.
  ``class_emb`` (B, width) replaces ``label_emb(y)`` (``class_embedding(y)``), e.g. a CADS-noised embedding.
  The label embedding has ``num_classes + 1`` rows; row ``num_classes`` is the null label (trained by label
  dropout), used when ``y`` is None, so the same network is the unconditional model.
* :class:`ToyClassifier` ``clf(x, t) -> logits (B, num_classes)`` and ``forward_features(x, t)`` (the
  pre-head features), a noisy classifier p(y | x_t, t).

Preconditioning (``precondition=True``, the default; EDM-style, Karras et al. 2022, written for eps): with
abar = abar_t of the model's own discrete schedule (``noise_schedule``, ``diffusion_steps``; the ADM formulas) and
data variance sigma_d^2, v = abar sigma_d^2 + 1 - abar,

    eps_theta(x, t, y) = c_skip x + c_out F(c_in x, t, y),   c_skip = sqrt(1 - abar) / v,
                         c_out = sqrt(abar) sigma_d / sqrt(v),  c_in = 1 / sqrt(v).

c_skip x is the exact E[eps | x_t] for Gaussian data N(0, sigma_d^2 I) and c_out^2 the remaining variance, so F
has a unit-scale target at every t. Without it, the eps error at t = T-1 (abar ~ 2e-9 for cosine) is amplified
by sqrt(1/abar - 1) ~ 2e4 into x0_hat, and unclipped samplers (the toy is not in [-1, 1]) blow up.

Backbone: ``h = W_in x``; ``depth`` residual blocks ``h <- h + W2 SiLU(W1 SiLU(LN(h) + e))`` where
``e = MLP(sinusoidal(t)) [+ Emb(y)]`` is added in every block; head ``W_out SiLU(LN(h))`` (zero-initialised
for the denoiser as ADM does for its output conv).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tailgen.models.nn import as_timestep_tensor, timestep_embedding
from tailgen.utils import ConfigError


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.act(self.norm(h) + e))))


class _ToyBackbone(nn.Module):
    def __init__(self, in_dim: int, width: int, depth: int, emb_dim: int):
        super().__init__()
        self.emb_dim = emb_dim
        self.time_embed = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)

    def features(self, x: torch.Tensor, t, extra: torch.Tensor | None = None) -> torch.Tensor:
        t = as_timestep_tensor(t, x.shape[0], x.device)
        e = self.time_embed(timestep_embedding(t, self.emb_dim).to(x.dtype))
        if extra is not None:
            e = e + extra
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, e)
        return nn.functional.silu(self.out_norm(h))


def discrete_alphas_cumprod(noise_schedule: str, diffusion_steps: int) -> np.ndarray:
    """abar_i, i = 0..T-1, of guided-diffusion's named schedules (float64): cosine (Nichol & Dhariwal 2021,
    beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999), f(s) = cos^2(((s + 0.008) / 1.008) pi / 2)) or linear
    (beta = linspace(1e-4 k, 0.02 k, T), k = 1000 / T)."""
    T = int(diffusion_steps)
    if noise_schedule == "cosine":
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    elif noise_schedule == "linear":
        k = 1000 / T
        betas = np.linspace(1e-4 * k, 0.02 * k, T, dtype=np.float64)
    else:
        raise ValueError(f"unknown noise_schedule {noise_schedule!r} (cosine or linear)")
    return np.cumprod(1.0 - betas)


class ToyDenoiser(nn.Module):
    """Class-conditional eps-prediction MLP for 2-D data (see module docstring)."""

    def __init__(self, in_dim: int = 2, width: int = 128, depth: int = 3, num_classes: int = 3,
                 learn_sigma: bool = False, emb_dim: int = 64, precondition: bool = False,
                 noise_schedule: str = "cosine", diffusion_steps: int = 1000, sigma_data: float = 1.0):
        super().__init__()
        self.in_dim, self.num_classes, self.learn_sigma = in_dim, num_classes, learn_sigma
        self.precondition = precondition
        if precondition:
            abar = torch.from_numpy(discrete_alphas_cumprod(noise_schedule, diffusion_steps))
            v = abar * sigma_data ** 2 + 1 - abar
            # float64 tables -> float32 coefficients (c_in, c_skip, c_out) per original timestep
            coefs = torch.stack([v.rsqrt(), (1 - abar).sqrt() / v, abar.sqrt() * sigma_data / v.sqrt()], 1)
            self.register_buffer("precond", coefs.float(), persistent=False)
        self.out_channels = in_dim * (2 if learn_sigma else 1)
        self.backbone = _ToyBackbone(in_dim, width, depth, emb_dim)
        self.label_emb = nn.Embedding(num_classes + 1, width)  # row num_classes = null label
        self.out = nn.Linear(width, self.out_channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def class_embedding(self, y: torch.Tensor | None) -> torch.Tensor:
        """``label_emb(y)`` (B, width), what ``forward(x, t, class_emb=...)`` takes instead of y (null label:
        y = num_classes)."""
        if y is None:
            raise ConfigError("ToyDenoiser.class_embedding needs labels y (the null label is index num_classes)")
        return self.label_emb(torch.as_tensor(y).long().reshape(-1))

    def forward(self, x: torch.Tensor, timesteps, y: torch.Tensor | None = None,
                class_emb: torch.Tensor | None = None) -> torch.Tensor:
        if class_emb is not None:
            if y is not None:
                raise ConfigError("pass labels y or a class embedding class_emb, not both")
            if tuple(class_emb.shape) != (x.shape[0], self.label_emb.embedding_dim):
                raise ConfigError(f"class_emb must have shape {(x.shape[0], self.label_emb.embedding_dim)}, "
                                  f"got {tuple(class_emb.shape)}")
            e = class_emb.to(x.dtype)
        else:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            e = self.label_emb(torch.as_tensor(y, device=x.device).long().reshape(-1).expand(x.shape[0]))
        if not self.precondition:
            return self.out(self.backbone.features(x, timesteps, e))
        t = as_timestep_tensor(timesteps, x.shape[0], x.device)
        c_in, c_skip, c_out = self.precond[t.round().long()].to(x.dtype).unbind(1)
        f = self.out(self.backbone.features(c_in[:, None] * x, t, e))
        eps = c_skip[:, None] * x + c_out[:, None] * f[:, : self.in_dim]
        return torch.cat([eps, f[:, self.in_dim:]], 1) if self.learn_sigma else eps


class ToyClassifier(nn.Module):
    """Noisy classifier p(y | x_t, t) on 2-D data: ``forward(x, t) -> logits``, ``forward_features``."""

    def __init__(self, in_dim: int = 2, width: int = 128, depth: int = 3, num_classes: int = 3, emb_dim: int = 64):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.backbone = _ToyBackbone(in_dim, width, depth, emb_dim)
        self.out = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor, timesteps) -> torch.Tensor:
        return self.backbone.features(x, timesteps)

    def forward(self, x: torch.Tensor, timesteps) -> torch.Tensor:
        return self.out(self.forward_features(x, timesteps))


def create_toy_denoiser(**flags) -> ToyDenoiser:
    """Builder mirroring ``create_model(**flags)``: flags are ToyDenoiser's keyword arguments."""
    return ToyDenoiser(**flags)


def create_toy_classifier(**flags) -> ToyClassifier:
    """Builder mirroring ``create_classifier(**flags)``: flags are ToyClassifier's keyword arguments."""
    return ToyClassifier(**flags)
