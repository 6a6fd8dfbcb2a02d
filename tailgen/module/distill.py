"""Data-free knowledge transfer to PPAP classifier experts (Go et al., "Towards Practical Plug-and-Play Diffusion
Models", CVPR 2023, arXiv 2212.05973, Sec. 4.2-4.3; their ``classifier_train.py``).

``tailgen fit --config configs/fashion/train_ppap_experts.yaml``. The teacher f_0 is a frozen *clean* classifier
(default preset ``fashion_clean_classifier``) evaluated on clean images at t = 0. Expert k (k = 0..N-1) is
``add_lora(copy of f_0)`` (``models/lora.py``: W' = W + (alpha / r) B A, B = 0 at the start, so every expert starts
as the teacher bit for bit; only A, B train), serving the timesteps lo_k..hi_k (``ppap_ranges``: PPAP's equal
split, or explicit ``t_ranges``) and always called with t = 0 (``fixed_t``, as PPAP feeds its experts x only).
The N experts form one :class:`~tailgen.models.experts.ClassifierExperts`, so a training batch is routed per
sample by its timestep exactly as the set is routed when sampling.

No labels are used (data-free): x0 are images *generated* by the diffusion model (PPAP: unconditional ADM samples;
here a ``samples.npz`` of ``tailgen predict``, :class:`~tailgen.module.datamodules.GeneratedSamplesDataModule`).
Each step, for sample b of a batch of B::

    k_b = b mod N,   t_b ~ U{lo_k..hi_k} (k = k_b)             stratified: every expert gets B / N samples
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)        (process.q_sample)
    p_b = softmax(f_0(x0_b, 0) / tau)                                     (teacher on the clean image, tau = 0.25)
    L   = 1/B sum_b KL(p_b || softmax(f_{k_b}(x_t_b, 0)))                 ("batchmean")
        = 1/B sum_b sum_c p_bc (log p_bc - log_softmax(f_{k_b}(x_t_b, 0))_c)

(PPAP ``classifier_train.py``: ``KLDivLoss(log_softmax(student), softmax(teacher / 0.25))``; the temperature
sharpens the teacher only.) Validation uses real labelled images (the datamodule's validation split): for each
expert, x_t at a few t inside its range (the mid-points of ``val_t_per_expert`` equal sub-ranges, fixed noise per
batch), the accuracy of the routed experts (``val/acc_expert{k}``), of the teacher on the same x_t
(``val/teacher_acc_expert{k}``) and optionally of a ``reference`` noisy classifier fed the true t
(``val/reference_acc_expert{k}``); ``val/acc`` is the mean over experts.

Export (``tools/export_weights.py`` on a checkpoint of this module): :func:`merged_experts` merges each expert's
update (``merge_lora``), giving N plain networks of the teacher's architecture, written as N weight files the size
of the teacher's and loaded as the expert list of ``model.init_args.classifier`` with ``fixed_t: 0``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tailgen.diffusion.adapters import NoisyClassifier
from tailgen.models.experts import ClassifierExperts, check_ranges, ppap_ranges
from tailgen.models.lora import add_lora, lora_parameters, merge_lora
from tailgen.models.presets import build_network
from tailgen.models.spec import NetworkSpec
from tailgen.models.speed import prepare_network
from tailgen.module.train import Attention, Autocast, _EMATrainer, training_process
from tailgen.utils.errors import ConfigError

DEFAULT_TEACHER = {"preset": "fashion_clean_classifier"}
_CLASSIFIER_KINDS = ("classifier", "toy_classifier", "resnet_classifier")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample KL(softmax(teacher / tau) || softmax(student)) [B] (its mean is PPAP's ``batchmean`` loss)."""
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def classifier_spec(args: dict | None, key: str = "model.init_args.teacher") -> NetworkSpec:
    """A classifier's :class:`NetworkSpec` from a dict of its arguments (``preset``, ``flags``, ``checkpoint``...;
    None: the default teacher); ``key`` names the config key in errors."""
    try:
        spec = NetworkSpec(**{"kind": "classifier", **(args or DEFAULT_TEACHER)})
    except TypeError as error:
        raise ConfigError(f"{key}: {error} (give preset / flags / checkpoint / kind / prefix)") from None
    if spec.kind not in _CLASSIFIER_KINDS:
        raise ConfigError(f"{key} must be a classifier, got a network of kind {spec.kind!r}")
    return spec


def student_network(spec: NetworkSpec, rank: int, alpha: float | None, include: str,
                    teacher: nn.Module | None = None) -> nn.Module:
    """One expert: a copy of ``teacher`` (or the bare architecture of ``spec``) with LoRA updates on the layers
    matching ``include``; everything but the LoRA factors frozen."""
    net = copy.deepcopy(teacher) if teacher is not None else build_network(spec.kind, spec.flags_resolved)
    add_lora(net, rank=rank, alpha=alpha, include=include)
    return net


def merged_experts(checkpoint: dict) -> tuple[list[nn.Module], list[tuple[int, int]], NetworkSpec]:
    """``(N plain expert networks with the LoRA updates merged, their t_ranges, the teacher's spec)`` from a
    checkpoint of :class:`ExpertDistillation` (``torch.load(..., weights_only=True)``)."""
    hp, sd = checkpoint["hyper_parameters"], checkpoint["state_dict"]
    if "expert_t_ranges" not in checkpoint:
        raise ConfigError("the checkpoint holds no expert_t_ranges: it is not one of ExpertDistillation")
    spec, ranges = classifier_spec(hp.get("teacher")), [tuple(r) for r in checkpoint["expert_t_ranges"]]
    nets = []
    for k in range(len(ranges)):
        prefix = f"net.experts.{k}."
        net = student_network(spec, hp.get("rank", 8), hp.get("alpha"), hp.get("include", ".*"))
        net.load_state_dict({n[len(prefix):]: v for n, v in sd.items() if n.startswith(prefix)}, strict=True)
        nets.append(merge_lora(net).float().eval().requires_grad_(False))
    return nets, ranges, spec


class ExpertDistillation(_EMATrainer):
    """Train N LoRA experts of a clean classifier by data-free distillation (see the module docstring).

    Args:
        teacher: the frozen clean classifier, ``NetworkSpec`` arguments (default ``{preset:
            fashion_clean_classifier}``); called at t = 0 on clean images.
        num_experts: N; the experts split 0..T-1 as PPAP (``ppap_ranges``) unless ``t_ranges`` is given.
        t_ranges: N inclusive [lo, hi] timestep ranges, sorted and contiguous over 0..T-1 (None: PPAP's split).
        rank, alpha, include: the LoRA update of each expert (``add_lora``: rank r, scale alpha / r, alpha None
            = r; ``include`` a regex of the layer names that get one).
        tau: temperature of the teacher's softmax (PPAP: 0.25).
        diffusion: ``DiffusionProcess.from_flags`` flags of the q(x_t | x0) the experts see (None: the teacher
            preset's); ``timestep_respacing`` must be empty.
        val_t_per_expert: how many timesteps per expert range validation noises the real images to.
        reference: optional ``NetworkSpec`` arguments of a noisy classifier (fed the true t) whose validation
            accuracy is logged beside the experts' (e.g. ``{preset: fashion_noisy_classifier}``).
        lr, weight_decay, warmup_steps, lr_schedule, num_threads, channels_last, autocast, attention, compile:
            as :class:`~tailgen.module.train.ClassifierTrainer` (AdamW over the LoRA factors only; no EMA).
    """

    def __init__(self, teacher: dict | None = None, num_experts: int = 4, t_ranges: list[list[int]] | None = None,
                 rank: int = 8, alpha: float | None = None, include: str = ".*", tau: float = 0.25,
                 diffusion: dict | None = None, val_t_per_expert: int = 3, reference: dict | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 50, lr_schedule: str = "constant",
                 num_threads: int | None = None, channels_last: bool = False, autocast: Autocast = None,
                 attention: Attention = "auto", compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if not tau > 0:
            raise ConfigError(f"model.init_args.tau must be > 0, got {tau}")
        if val_t_per_expert < 1:
            raise ConfigError(f"model.init_args.val_t_per_expert must be >= 1, got {val_t_per_expert}")
        spec = classifier_spec(teacher)
        self.process = training_process(diffusion if diffusion is not None else spec.diffusion_flags)
        steps = self.process.num_steps
        if t_ranges is None:
            ranges = ppap_ranges(num_experts, steps)
        else:
            ranges = check_ranges(t_ranges, steps, key="model.init_args.t_range")
            if len(ranges) != num_experts:
                raise ConfigError(f"model.init_args.t_ranges has {len(ranges)} ranges but num_experts is "
                                  f"{num_experts}: give one range per expert")
        self.tau = float(tau)
        self.teacher = spec.build(key="model.init_args.teacher")
        students = [student_network(spec, rank, alpha, include, self.teacher) for _ in ranges]
        self.net = ClassifierExperts(students, ranges, fixed_t=[0] * len(ranges)).train()  # copies of an eval net
        trainable = {id(p) for p in self.net.parameters() if p.requires_grad}
        if trainable != {id(p) for p in lora_parameters(self.net)}:  # add_lora froze every backbone weight
            raise ConfigError("ExpertDistillation: an expert's backbone weight is trainable; only LoRA factors train")
        key = "model.init_args.reference"
        self.reference = classifier_spec(reference, key).build(key=key) if reference else None
        self._init_common(lr, weight_decay, warmup_steps, 0.0, num_threads, channels_last, lr_schedule, None,
                          autocast, attention, compile)
        for net in (self.teacher, self.reference):
            if net is not None:
                prepare_network(net, channels_last=channels_last, attention=attention)
        self.val_t = [[lo + (hi - lo + 1) * (2 * j + 1) // (2 * val_t_per_expert) for j in range(val_t_per_expert)]
                      for lo, hi in ranges]
        self.register_buffer("_lo", torch.tensor([lo for lo, _ in ranges]), persistent=False)
        self.register_buffer("_hi", torch.tensor([hi for _, hi in ranges]), persistent=False)

    @property
    def num_experts(self) -> int:
        return len(self.net.t_ranges)

    def train(self, mode: bool = True):
        super().train(mode)
        for net in (self.teacher, self.reference):  # frozen networks stay in eval mode
            if net is not None:
                net.eval()
        return self

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B] int64: sample b gets expert k = b mod N and t ~ U{lo_k..hi_k} (stratified over the experts)."""
        k = torch.arange(batch, device=self._lo.device) % self.num_experts
        lo, hi = self._lo[k], self._hi[k]
        u = torch.rand(batch, generator=generator).to(lo.device)
        return lo + torch.minimum((u * (hi - lo + 1)).long(), hi - lo)

    def teacher_logits(self, x0: torch.Tensor) -> torch.Tensor:
        """f_0(x0, 0), float32, without gradients."""
        with torch.no_grad():
            return self.network_call(self.teacher)(x0, torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device))

    def student_logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The experts' logits on x_t, each sample routed by its timestep (through the sampling adapter)."""
        return NoisyClassifier(self.network_call(self.net), self.process)(x_t, t)

    def losses(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample ``kl`` [B] and ``agree`` (student argmax = teacher argmax) [B] on x_t = q_sample(x0, t, noise)."""
        target = self.teacher_logits(x0)
        student = self.student_logits(self.process.q_sample(x0, t, noise), t)
        return {"kl": distillation_kl(student, target, self.tau),
                "agree": (student.argmax(1) == target.argmax(1)).float()}

    def training_step(self, batch, batch_idx):
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch  # labels, if any, are not used (data-free)
        t = self.sample_timesteps(x0.shape[0]).to(x0.device)
        terms = self.losses(x0, t, torch.randn_like(x0))
        loss = terms["kl"].mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/agree", terms["agree"].mean())
        which = self.net.expert_index(t)
        for k in range(self.num_experts):
            if (which == k).any():  # always, unless the batch is smaller than N
                self.log(f"train/kl_expert{k}", terms["kl"][which == k].mean())
        return loss

    def validation_step(self, batch, batch_idx):
        x0, y = batch
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(batch_idx)).to(x0.device)
        accs = []
        for k, ts in enumerate(self.val_t):
            acc = {"acc": 0.0, "teacher_acc": 0.0, "reference_acc": 0.0}
            for tv in ts:
                t = torch.full((b,), tv, dtype=torch.long, device=x0.device)
                x_t = self.process.q_sample(x0, t, noise) if tv > 0 else x0
                acc["acc"] += (self.student_logits(x_t, t).argmax(1) == y).float().mean() / len(ts)
                acc["teacher_acc"] += (self.teacher_logits(x_t).argmax(1) == y).float().mean() / len(ts)
                if self.reference is not None:
                    logits = NoisyClassifier(self.network_call(self.reference), self.process)(x_t, t)
                    acc["reference_acc"] += (logits.argmax(1) == y).float().mean() / len(ts)
            for name, value in acc.items():
                if name != "reference_acc" or self.reference is not None:
                    self.log(f"val/{name}_expert{k}", value, batch_size=b)
            accs.append(acc["acc"])
        self.log("val/acc", sum(accs) / len(accs), batch_size=b, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["expert_t_ranges"] = [list(r) for r in self.net.t_ranges]  # what the export needs


__all__ = ["ExpertDistillation", "distillation_kl", "merged_experts", "student_network", "classifier_spec"]
