"""LightningModules that train tailgen's own networks (``tailgen fit --config configs/fashion/train_*.yaml``).

The losses are in :mod:`tailgen.diffusion.losses` (equations there), and the networks are called through the
sampling adapters (:class:`~tailgen.diffusion.adapters.ADMDenoiser` / ``NoisyClassifier``): timestep mapping and
``rescale_timesteps``, the learned-sigma channel split and ``predict_xstart`` are handled in that one place, for
training as for sampling.

:class:`DiffusionTrainer` -- class-conditional diffusion model with the IDDPM hybrid loss (L_simple + lambda L_vlb,
the variance output learning from L_vlb only). Label dropout: with probability ``label_dropout`` the label is
replaced by the null label ``num_classes`` (the label embedding has ``num_classes + 1`` rows), so
eps_theta(x_t, t, null) is an unconditional model (classifier-free guidance, Ho & Salimans 2022). An exponential
moving average of the weights, theta_ema <- d theta_ema + (1 - d) theta with d = min(ema_decay, (1 + n) / (10 + n))
at update n, is kept in the checkpoint (``ema.*``) and is what gets exported and validated.
:class:`~tailgen.module.super_res.SuperResTrainer` (``super_res.py``) trains a cascade's upsampler the same way.

:class:`ClassifierTrainer` -- ADM classifier training (Dhariwal & Nichol 2021, ``classifier_train.py``):
cross-entropy of p_phi(y | x_t, t) on x_t ~ q(x_t | x0) with t ~ U{0..t_max-1} (``noised=True``), or a clean
classifier evaluated at t = 0 (``noised=False``); optionally ECT (``ect_lambda``: CE + lambda (log C - H(p))).
Validation reports accuracy at fixed t and at "small t" (t ~ U{0..small_t-1}, fixed noise), and the mean
normalised entropy H(p) / log C at each fixed t.

Speed options (as for sampling, ``tailgen.models.speed``): ``autocast`` (null | auto | bf16 | fp16; network
forward under torch.autocast, outputs and losses float32; beside or instead of Lightning's ``precision``),
``channels_last``, ``attention`` (auto | matmul | sdpa) and ``compile`` (torch.compile of the trained network;
the EMA copy used for validation is not compiled). None of them changes the checkpoint's keys.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from tailgen.data import augment
from tailgen.diffusion.adapters import ADMDenoiser, NoisyClassifier
from tailgen.diffusion.losses import entropy_constrained_loss, entropy_gap, hybrid_loss
from tailgen.diffusion.process import DiffusionProcess
from tailgen.models.presets import build_network
from tailgen.models.speed import fast_network, prepare_network, resolve_autocast
from tailgen.utils.errors import ConfigError

Autocast = Optional[Literal["auto", "bf16", "fp16"]]
Attention = Literal["auto", "matmul", "sdpa"]


def training_process(diffusion: dict | None) -> DiffusionProcess:
    """The full (not respaced) process the networks are trained on: indices i are the original timesteps."""
    process = DiffusionProcess.from_flags(**(diffusion or {}))
    if process.num_steps != process.num_train_steps:
        raise ConfigError("model.init_args.diffusion.timestep_respacing: training needs the full process (every "
                          "original timestep); leave it empty (respacing is a sampling option)")
    return process


class NetworkCall:
    """``net(x, ...)`` as the trainers call it: x in channels-last layout when asked (images only), the output
    cast to float32 (under Lightning's mixed precision it would be bf16 / fp16)."""

    def __init__(self, call: Callable, channels_last: bool):
        self.call, self.channels_last = call, channels_last

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.call(x, *args, **kwargs).float()


class _EMATrainer(L.LightningModule):
    """Shared plumbing: thread count, speed options, AdamW with linear warm-up, EMA copy of ``self.net`` stored as
    ``self.ema``."""

    net: nn.Module

    def _init_common(self, lr, weight_decay, warmup_steps, ema_decay, num_threads, channels_last,
                     lr_schedule="constant", init_from=None, autocast=None, attention="auto", compile=False):
        if init_from:  # fine-tune from exported weights: network and EMA start there, EMA at full decay
            from tailgen.models.checkpoint import load_checkpoint

            load_checkpoint(self.net, init_from)
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.lr, self.weight_decay, self.warmup_steps, self.lr_schedule = lr, weight_decay, warmup_steps, lr_schedule
        self.ema_decay, self.num_threads, self.channels_last = ema_decay, num_threads, channels_last
        resolve_autocast(autocast, "cpu")  # a bad value fails here, not at the first batch
        self.autocast, self.compile_network = autocast, compile
        prepare_network(self.net, channels_last=channels_last, attention=attention)  # the EMA copy inherits both
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval() if ema_decay > 0 else None
        # an EMA that starts from trained weights must not restart its (1 + n) / (10 + n) warm-up
        start = 10**6 if init_from else 0
        self.register_buffer("ema_updates", torch.full((), start, dtype=torch.long))
        self._calls: dict = {}  # (network role, device type) -> NetworkCall (not submodules: state dict unchanged)

    def network_call(self, net: nn.Module) -> NetworkCall:
        """``net`` (``self.net`` or ``self.ema``) called with the speed options: autocast dtype of this device,
        torch.compile for the trained network, channels-last inputs, float32 outputs."""
        role = "net" if net is self.net else "ema" if net is self.ema else None
        key = (role, self.device.type)
        if role is None or key not in self._calls:
            dtype = resolve_autocast(self.autocast, self.device)
            call = NetworkCall(fast_network(net, autocast=dtype, compile=self.compile_network and role == "net"),
                               self.channels_last)
            if role is None:
                return call
            self._calls[key] = call
        return self._calls[key]

    def setup(self, stage: str) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]  # all, or the LoRA factors (distill.py)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.warmup_steps <= 0 and self.lr_schedule == "constant":
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self.lr_schedule == "cosine" else 0
        warm = max(self.warmup_steps, 1)

        def factor(s: int) -> float:  # linear warm-up, then constant or cosine decay to 0 over the run
            f = min(1.0, (s + 1) / warm)
            return f * 0.5 * (1.0 + math.cos(math.pi * min(s / total, 1.0))) if total else f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is None:
            return
        n = int(self.ema_updates)
        d = min(self.ema_decay, (1 + n) / (10 + n))
        ema_p = list(self.ema.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in self.net.parameters()], 1.0 - d)
        for eb, b in zip(self.ema.buffers(), self.net.buffers()):
            eb.copy_(b)
        self.ema_updates += 1

    @property
    def eval_net(self) -> nn.Module:
        """The network used for validation and export: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.net


class DiffusionTrainer(_EMATrainer):
    """Train a class-conditional diffusion model (IDDPM hybrid loss, label dropout, EMA); see module docstring.

    Args:
        network: network flags (guided-diffusion ``create_model`` flags for ``arch="adm"``, e.g. ``image_size,
            in_channels, num_channels, num_res_blocks, channel_mult, attention_resolutions, learn_sigma,
            class_cond, num_classes``; :class:`~tailgen.models.toy.ToyDenoiser` kwargs for ``"toy_mlp"``).
        diffusion: ``DiffusionProcess.from_flags`` flags (``diffusion_steps, noise_schedule, learn_sigma``...);
            ``timestep_respacing`` must be empty for training.
        arch: "adm" or "toy_mlp".
        num_classes: number of real classes; the null label is ``num_classes``.
        label_dropout: probability of replacing a label by the null label.
        vlb_weight: lambda of L_hybrid (used only with learned sigma).
        lr, weight_decay, warmup_steps: AdamW and linear warm-up.
        lr_schedule: "constant" (after warm-up) or "cosine" (decay to 0 over ``trainer.estimated_stepping_batches``).
        ema_decay: EMA decay (0 disables EMA).
        num_threads: ``torch.set_num_threads`` at setup (None leaves it).
        channels_last: channels-last weights and inputs (faster convolutions with oneDNN / cuDNN).
        init_from: a weights file (e.g. ``tailgen/weights/fashion_diffusion.pt``) to start from instead of a
            random initialisation; the EMA starts from it too, at full decay (fine-tuning a shipped model).
        autocast: run the network forward under ``torch.autocast`` (``bf16`` / ``fp16``; ``auto``: bf16 where the
            hardware has fast bf16; null: float32 unless Lightning's ``precision`` says otherwise); losses float32.
        attention: ``auto`` (SDPA off-CPU; on CPU SDPA for >= 1024 tokens, matmul below), ``matmul`` or ``sdpa``.
        compile: ``torch.compile`` the trained network (the first steps pay the compile time).
    """

    network_kind = "model"  # the builder kind of ``network`` (``SuperResTrainer``: "upsampler")

    def __init__(self, network: dict, diffusion: dict | None = None, arch: str = "adm", num_classes: int = 10,
                 label_dropout: float = 0.1, vlb_weight: float = 1.0, lr: float = 2e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 200, ema_decay: float = 0.9995, num_threads: int | None = None,
                 channels_last: bool = False, lr_schedule: str = "constant", init_from: str | None = None,
                 autocast: Autocast = None, attention: Attention = "auto", compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.process = training_process(diffusion)
        self.arch, self.num_classes = arch, num_classes
        self.label_dropout, self.vlb_weight = label_dropout, vlb_weight
        if arch == "adm" and network.get("class_cond") and label_dropout > 0 \
                and network.get("num_classes", 1000) != num_classes + 1:
            raise ConfigError(f"label dropout needs a null label: set network.num_classes = {num_classes + 1} "
                              f"({num_classes} classes + the null label {num_classes})")
        self.net = build_network(self.network_kind, network, arch=arch)
        self._init_common(lr, weight_decay, warmup_steps, ema_decay, num_threads, channels_last, lr_schedule,
                          init_from, autocast, attention, compile)

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null label ``num_classes`` with probability ``label_dropout``."""
        if self.label_dropout <= 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def denoiser(self, net: nn.Module) -> ADMDenoiser:
        """``net`` (``self.net`` or ``self.ema``) behind the sampling adapter, with the speed options."""
        return ADMDenoiser(self.network_call(net), self.process)

    def losses(self, net: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample ``mse`` (L_simple), ``vb`` (L_vlb, bits/dim; zeros without learned sigma) and ``loss``
        (:func:`~tailgen.diffusion.losses.hybrid_loss` through the adapter); ``t`` original timesteps [B]."""
        return hybrid_loss(self.denoiser(net), x0, t, noise, y, self.vlb_weight)

    def training_step(self, batch, batch_idx):
        x0, y = batch
        t = torch.randint(0, self.process.num_steps, (x0.shape[0],), device=x0.device)
        terms = self.losses(self.net, x0, self.drop_labels(y), t, torch.randn_like(x0))
        loss = terms["loss"].mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", terms["mse"].mean())
        self.log("train/vb", terms["vb"].mean())
        return loss

    def validation_step(self, batch, batch_idx):
        x0, y = batch
        g = torch.Generator().manual_seed(batch_idx)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        # one t per image, cycling over an even grid so every validation pass sees the same (x0, t, eps)
        n = x0.shape[0]
        t = (torch.arange(n) * 997 + batch_idx * 31) % self.process.num_steps
        terms = self.losses(self.eval_net, x0, y, t.to(x0.device), noise)
        for k in ("loss", "mse", "vb"):
            self.log(f"val/{k}", terms[k].mean(), prog_bar=k == "loss", batch_size=n)


class ClassifierTrainer(_EMATrainer):
    """Train a noisy (ADM) or clean classifier with cross-entropy; see module docstring.

    Args:
        network: ``create_classifier`` flags (``arch="adm"``: ``image_size, in_channels, num_classes,
            classifier_width, classifier_depth, classifier_attention_resolutions, classifier_pool``...) or
            :class:`~tailgen.models.toy.ToyClassifier` kwargs (``"toy_mlp"``).
        diffusion: ``DiffusionProcess.from_flags`` flags (the q(x_t | x0) the classifier sees).
        noised: True: x_t ~ q(x_t | x0) with t ~ U{0..t_max-1}; False: clean images, t = 0.
        t_max: upper bound of training t (None: all T steps).
        small_t: validation "small t" range, t ~ U{0..small_t-1}.
        val_t: fixed t values at which validation accuracy is reported (noised only).
        random_flip: horizontal flip augmentation (images only).
        random_crop: pad by this many background pixels and crop back at a random offset (0: off).
        random_erasing: probability of erasing one random rectangle per image (Zhong et al. 2020; 0: off).
        label_smoothing: cross-entropy label smoothing.
        ect_lambda: lambda of ECT, entropy-constraint training (Li, Zheng et al., ECCV 2022): the loss is
            CE + lambda (log C - H(p)) with H the entropy of the classifier's softmax on x_t
            (:func:`~tailgen.diffusion.losses.entropy_constrained_loss`); 0: plain cross-entropy. The paper's
            released ImageNet classifier used 0.1.
        lr, weight_decay, warmup_steps, lr_schedule, ema_decay, num_threads, channels_last, init_from, autocast,
            attention, compile: as :class:`DiffusionTrainer`.
    """

    def __init__(self, network: dict, diffusion: dict | None = None, arch: str = "adm", noised: bool = True,
                 t_max: int | None = None, small_t: int = 100, val_t: list[int] | None = None,
                 random_flip: bool = False, random_crop: int = 0, random_erasing: float = 0.0,
                 label_smoothing: float = 0.0, lr: float = 3e-4, weight_decay: float = 0.05, warmup_steps: int = 100,
                 ema_decay: float = 0.0, num_threads: int | None = None, channels_last: bool = False,
                 lr_schedule: str = "constant", init_from: str | None = None, ect_lambda: float = 0.0,
                 autocast: Autocast = None, attention: Attention = "auto", compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.process = training_process(diffusion)
        if not (ect_lambda >= 0 and math.isfinite(ect_lambda)):
            raise ConfigError(f"ect_lambda must be a finite number >= 0 (0 = plain cross-entropy), got {ect_lambda}")
        self.ect_lambda = ect_lambda
        self.arch, self.noised, self.random_flip = arch, noised, random_flip
        self.random_crop, self.random_erasing, self.label_smoothing = random_crop, random_erasing, label_smoothing
        self.t_max = min(t_max or self.process.num_steps, self.process.num_steps)
        self.small_t = small_t
        self.val_t = list(val_t) if val_t is not None else ([0, 100, 250, 500, 750] if noised else [0])
        self.net = build_network("classifier", network, arch=arch)
        self._init_common(lr, weight_decay, warmup_steps, ema_decay, num_threads, channels_last, lr_schedule,
                          init_from, autocast, attention, compile)

    def classifier(self, net: nn.Module) -> NoisyClassifier:
        """``net`` (``self.net`` or ``self.ema``) behind the sampling adapter, with the speed options."""
        return NoisyClassifier(self.network_call(net), self.process)

    def _logits(self, net: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Logits on x_t ~ q(x_t | x0) at timesteps ``t`` (clean x0 when ``noise`` is None), float32."""
        x = x0 if noise is None else self.process.q_sample(x0, t, noise)
        return self.classifier(net)(x, t)

    def augment_batch(self, x0: torch.Tensor) -> torch.Tensor:
        """Training augmentations of image batches (flip, crop, erasing as configured); other data unchanged."""
        if x0.dim() != 4:
            return x0
        if self.random_flip:
            x0 = augment.random_flip(x0)
        if self.random_crop:
            x0 = augment.random_crop(x0, self.random_crop)
        if self.random_erasing:
            x0 = augment.random_erasing(x0, self.random_erasing)
        return x0

    def training_step(self, batch, batch_idx):
        x0, y = batch
        x0 = self.augment_batch(x0)
        b = x0.shape[0]
        if self.noised:
            t = torch.randint(0, self.t_max, (b,), device=x0.device)
            logits = self._logits(self.net, x0, t, torch.randn_like(x0))
        else:
            logits = self._logits(self.net, x0, torch.zeros(b, dtype=torch.long, device=x0.device), None)
        terms = entropy_constrained_loss(logits, y, self.ect_lambda, self.label_smoothing)
        self.log("train/loss", terms["loss"], prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        if self.ect_lambda:
            self.log("train/ce", terms["ce"])
            self.log("train/entropy_gap", terms["entropy_gap"])
        return terms["loss"]

    def validation_step(self, batch, batch_idx):
        x0, y = batch
        b, net = x0.shape[0], self.eval_net
        g = torch.Generator().manual_seed(batch_idx)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        for tv in self.val_t:
            t = torch.full((b,), tv, dtype=torch.long, device=x0.device)
            logits = self._logits(net, x0, t, noise if (self.noised and tv > 0) else None)
            self.log(f"val/acc_t{tv}", (logits.argmax(1) == y).float().mean(), batch_size=b, prog_bar=tv == 0)
            log_c = math.log(logits.shape[1])  # normalised entropy H(p) / log C: what ECT keeps from collapsing
            self.log(f"val/entropy_t{tv}", (1 - entropy_gap(logits) / log_c).mean(), batch_size=b)
            if tv == 0:
                self.log("val/loss", F.cross_entropy(logits, y), batch_size=b)
        if self.noised:
            t = torch.randint(0, self.small_t, (b,), generator=g).to(x0.device)
            logits = self._logits(net, x0, t, noise)
            self.log("val/acc_small_t", (logits.argmax(1) == y).float().mean(), batch_size=b, prog_bar=True)


class PrintProgress(L.Callback):
    """One plain log line every ``every_n_steps`` optimiser steps (for ``nohup`` logs without a progress bar):
    epoch, step, logged train metrics and the throughput in images/s since the previous line; and the
    validation metrics at the end of each validation."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps
        self._t0 = None
        self._images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        self._images += int(batch[0].shape[0])
        if self._t0 is None:
            self._t0, self._images = time.perf_counter(), 0
            return
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            now = time.perf_counter()
            rate = self._images / max(now - self._t0, 1e-9)
            metrics = " ".join(f"{k}={float(v):.4f}" for k, v in trainer.callback_metrics.items()
                               if k.startswith("train/"))
            print(f"epoch {trainer.current_epoch} step {step} {metrics} {rate:.1f} img/s", flush=True)
            self._t0, self._images = now, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = " ".join(f"{k}={float(v):.4f}" for k, v in trainer.callback_metrics.items() if k.startswith("val/"))
        print(f"validation epoch {trainer.current_epoch} step {trainer.global_step}: {metrics}", flush=True)


def ema_state_dict(checkpoint: dict) -> tuple[dict[str, torch.Tensor], str]:
    """The exportable network weights of a trainer checkpoint: ``ema.*`` if present, else ``net.*``.

    Returns ``(state_dict without the prefix, prefix used)``.
    """
    sd = checkpoint["state_dict"]
    prefix = "ema." if any(k.startswith("ema.") for k in sd) else "net."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix.rstrip(".")


__all__ = ["DiffusionTrainer", "ClassifierTrainer", "NetworkCall", "PrintProgress", "ema_state_dict",
           "training_process"]
