"""Target-confidence guidance (methods.md §4.1 (e)) with a target calibrated per noise level on real data.

**tailgen's formulation, not the target paper's.** Variant (e) pulls the noisy classifier's confidence
p = p_phi(y | x_t, t) toward a fixed c*. But what p a *real* image of class y has at x_t depends strongly on t: near
t = T every x_t is noise and p ~ 1/C, near t = 0 a typical training image has p ~ 1. A fixed c* = 0.5 therefore
pushes *up* at high noise (ADM-G-like, toward the class prototype) and *down* at low noise. Here c* follows the
confidence of real images of the class instead::

    c*(t) = Q_q { p_phi(y_n | sqrt(abar_t) x0_n + sqrt(1 - abar_t) z_n, t) : (x0_n, y_n) real, z_n ~ N(0, I) }

the q-quantile (``target_quantile``, e.g. 0.2: "as confident as the least typical 20 % of real images") over a
subsample of real training images noised to t, pooled over classes or per class y (``per_class``). It is tabulated
once per classifier on a grid of ``num_times`` original timesteps (IDDPM spacing, t = 0 and T-1 included; linear
interpolation in t in between), and the per-image probabilities are cached on disk under a key hashing the
classifier's weights, the noise schedule, the exact images and labels, the grid and the seed
(``<cache_dir>/<key>.npz``; a second build reads the file). The guidance direction is (e)'s::

    d = -grad (p - c*(t))^2 = -2 (p - c*(t)) p g_y             (target_space = prob)
    d = -grad (log p - log c*(t))^2 = -2 log(p / c*(t)) g_y     (target_space = log)

Below the real quantile the term pushes confidence up, above it down, at every noise level, so the sampler is
steered toward the class's low-confidence tail *as real data has it*, not toward an arbitrary level.

Calibration data: ``fashion_mnist`` (the training split, ``tailgen.data.fashion_mnist``; balanced over the classes)
or ``toy`` (the 2-D mixture of ``tailgen.data.toy``). Cost: ``num_images x num_times`` classifier forwards once (no
gradients; about 5 min on one loaded CPU thread for the Fashion classifier at the defaults 1000 x 20, seconds on a
GPU), then nothing per step beyond (e)'s.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tailgen.data import toy
from tailgen.data.fashion_mnist import NUM_CLASSES, load_fashion_mnist, to_model_range
from tailgen.diffusion.adapters import NoisyClassifier
from tailgen.diffusion.process import DiffusionProcess
from tailgen.guidance.base import GradientGuidance, StepContext
from tailgen.guidance.low_density import TARGET_SPACES, LowDensityGuidance, TargetSpace
from tailgen.utils import ConfigError
from tailgen.utils.io import array_digest, atomic_write, module_digest

CalibrationData = Literal["fashion_mnist", "toy"]
DEFAULT_CACHE_DIR = "~/.cache/tailgen/confidence"
_FORMAT = "tailgen-confidence-v1"


@dataclass
class ConfidenceTable:
    """p_phi(y_n | x_t) of real images on a grid of original timesteps: ``timesteps`` [T'] ascending,
    ``p_true`` [T', N], ``labels`` [N]."""

    timesteps: np.ndarray
    p_true: np.ndarray
    labels: np.ndarray

    def quantile(self, q: float, per_class: bool = False) -> np.ndarray:
        """The q-quantile per timestep: [T'] pooled, or [C, T'] per class (C = max label + 1)."""
        if not per_class:
            return np.quantile(self.p_true, q, axis=1)
        classes = range(int(self.labels.max()) + 1)
        return np.stack([np.quantile(self.p_true[:, self.labels == c], q, axis=1) for c in classes])


def tabulate_confidence(classifier: NoisyClassifier, images: Tensor, labels: Tensor, *, num_times: int,
                        seed: int = 0, batch_size: int = 500, progress: bool = True) -> ConfidenceTable:
    """p(y | x_t) of ``images`` (model range, on CPU) noised to ``num_times`` original timesteps (IDDPM spacing
    of the classifier's base schedule), with noise from ``torch.Generator().manual_seed(seed)``. No gradients."""
    base = classifier.process
    grid = DiffusionProcess(base.base_betas, timestep_respacing=str(num_times), rescale_timesteps=base.rescale_timesteps)
    clf = NoisyClassifier(classifier.net, grid)
    device = next(iter(classifier.net.parameters())).device
    gen = torch.Generator().manual_seed(seed)
    p = np.zeros((num_times, len(images)), dtype=np.float32)
    with torch.no_grad():
        for i in tqdm(range(num_times), desc="confidence table", disable=not progress, leave=False):
            for start in range(0, len(images), batch_size):
                x0 = images[start:start + batch_size]
                y = labels[start:start + batch_size].to(device)
                x_t = grid.q_sample(x0, i, torch.randn(x0.shape, generator=gen)).to(device)
                log_probs = torch.log_softmax(clf(x_t, i).float(), dim=-1)
                p[i, start:start + len(x0)] = log_probs.gather(1, y[:, None])[:, 0].exp().cpu().numpy()
    return ConfidenceTable(grid.timestep_map.copy(), p, labels.numpy().copy())


def cached_confidence_table(classifier: NoisyClassifier, images: Tensor, labels: Tensor, *, num_times: int,
                            seed: int = 0, cache_dir: Optional[str | os.PathLike] = DEFAULT_CACHE_DIR,
                            progress: bool = True) -> ConfidenceTable:
    """``tabulate_confidence`` through the disk cache (``cache_dir=None``: no cache). The key hashes the classifier's
    weights, its base schedule and timestep convention, the images and labels, the grid size and the seed."""
    if cache_dir is None:
        return tabulate_confidence(classifier, images, labels, num_times=num_times, seed=seed, progress=progress)
    content = "|".join([_FORMAT, module_digest(classifier.net), array_digest(classifier.process.base_betas),
                        str(classifier.process.rescale_timesteps), array_digest(images, labels), str(num_times),
                        str(seed)])
    path = Path(cache_dir).expanduser() / f"{hashlib.sha256(content.encode()).hexdigest()[:40]}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return ConfidenceTable(z["timesteps"], z["p_true"], z["labels"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: recompute and overwrite
    table = tabulate_confidence(classifier, images, labels, num_times=num_times, seed=seed, progress=progress)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, timesteps=table.timesteps, p_true=table.p_true, labels=table.labels)

    atomic_write(path, write)
    return table


def calibration_images(data: str, num_images: int, seed: int, like: Tensor,
                       root: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """``num_images`` real (images in model range shaped like one sample of ``like``, labels) for the table."""
    g = torch.Generator().manual_seed(seed)
    if data == "toy":
        x, y, _ = toy.sample(num_images, generator=g)
        return x.float(), y.long()
    if data == "fashion_mnist":
        images, labels = load_fashion_mnist("train", root)
        rng = np.random.default_rng(seed)
        per_class = -(-num_images // NUM_CLASSES)
        idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(NUM_CLASSES)])
        idx = np.sort(rng.permutation(idx)[:num_images])
        x = to_model_range(images[idx], like.shape[-1])
        if x.shape[1:] != like.shape[1:]:
            raise ConfigError(f"calibration images have shape {tuple(x.shape[1:])} but the model samples "
                              f"{tuple(like.shape[1:])}: use calibration_data matching the model")
        return x, torch.from_numpy(labels[idx]).long()
    raise ConfigError(f"unknown calibration_data {data!r}: use fashion_mnist or toy")


class CalibratedTargetGuidance(LowDensityGuidance):
    """Variant (e) with c*(t) = the ``target_quantile`` of real images' p(y | x_t) at t (see the module docstring).

    Args:
        target_quantile: q in (0, 1); c*(t) is the q-quantile of real images' confidence at t.
        per_class: quantiles per class y (c* depends on the sample's label) instead of pooled.
        calibration_data: ``fashion_mnist`` or ``toy``; ``data_root``: folder of the Fashion-MNIST files.
        num_images, num_times, calibration_seed: the table's subsample, timestep grid and noise seed.
        cache_dir: where tables are cached (None: rebuild every run).
        target_space: see ``LowDensityGuidance``; **kwargs: scale, form, max_norm and the window (``GradientGuidance``).
    """

    def __init__(self, target_quantile: float = 0.2, per_class: bool = False,
                 calibration_data: CalibrationData = "fashion_mnist", data_root: Optional[str] = None,
                 num_images: int = 1000, num_times: int = 20, calibration_seed: int = 0,
                 cache_dir: Optional[str] = DEFAULT_CACHE_DIR, target_space: TargetSpace = "prob", scale: float = 1.0, **kwargs):
        GradientGuidance.__init__(self, scale=scale, **kwargs)  # form, max_norm, window and schedule
        name = type(self).__name__
        if not 0.0 < target_quantile < 1.0:
            raise ConfigError(f"{name}: target_quantile must lie in (0, 1), got {target_quantile}")
        if target_space not in TARGET_SPACES:
            raise ConfigError(f"{name}: target_space must be one of {', '.join(TARGET_SPACES)}, got {target_space!r}")
        if calibration_data not in ("fashion_mnist", "toy"):
            raise ConfigError(f"{name}: unknown calibration_data {calibration_data!r}: use fashion_mnist or toy")
        if num_images < 10 or num_times < 2:
            raise ConfigError(f"{name}: need num_images >= 10 and num_times >= 2, got {num_images}, {num_times}")
        self.variant, self.target_space = "target", target_space
        self.target_quantile, self.per_class = float(target_quantile), bool(per_class)
        self.calibration_data, self.data_root = calibration_data, data_root
        self.num_images, self.num_times, self.calibration_seed = int(num_images), int(num_times), int(calibration_seed)
        self.cache_dir = cache_dir
        self._curve: Optional[tuple[np.ndarray, np.ndarray]] = None  # (timesteps, quantiles [T'] or [C, T'])

    @property
    def fixed_point(self) -> Optional[float]:
        return None  # c* moves with t

    def calibrate(self, ctx: StepContext) -> ConfidenceTable:
        """Build (or read from the cache) the table for the step's classifier; sets the quantile curve."""
        if not isinstance(ctx.noisy_classifier, NoisyClassifier):
            raise ConfigError(f"{type(self).__name__} needs the module's NoisyClassifier (set model.classifier)")
        images, labels = calibration_images(self.calibration_data, self.num_images, self.calibration_seed, ctx.x,
                                            self.data_root)
        table = cached_confidence_table(ctx.noisy_classifier, images, labels, num_times=self.num_times,
                                        seed=self.calibration_seed, cache_dir=self.cache_dir)
        self._curve = (table.timesteps.astype(np.float64), table.quantile(self.target_quantile, self.per_class))
        return table

    def target_at(self, ctx: StepContext) -> float | Tensor:
        if self._curve is None:
            self.calibrate(ctx)
        timesteps, curve = self._curve
        eps = 1e-4  # keep log c* finite
        if not self.per_class:
            return float(np.clip(np.interp(ctx.t, timesteps, curve), eps, 1 - eps))
        per_class = np.array([np.interp(ctx.t, timesteps, row) for row in curve])
        if int(ctx.labels.max()) >= len(per_class):
            raise ConfigError(f"{type(self).__name__}: label {int(ctx.labels.max())} has no calibration data")
        c = torch.from_numpy(np.clip(per_class, eps, 1 - eps)).to(ctx.x.device)
        return c[ctx.labels]
