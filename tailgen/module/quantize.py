"""The ``quantize: int8`` option of ``GuidedDiffusion``: calibration inputs collected along the module's own
sampling trajectories (PTQ4DM, Shang et al., CVPR 2023), then ``models.quantize.quantize_unet``.

PTQ4DM's calibration set: inputs ``(x_t, t, y)`` that the float network itself produces while sampling (not noised
training images), at timesteps drawn from a normal distribution ("normally distributed time-step calibration",
NDTC) whose mean lies nearer the image end of the chain than the middle. Here a draw is
``u ~ N(mean, std^2)`` as a fraction of the run (0 = the last step, t near 0; 1 = the first step, pure noise),
clipped to [0, 1], taken to sampler step ``i = round(u (K - 1))`` of the K steps. The defaults ``mean = 0.4``,
``std = 0.4`` are those of PTQ4DM's published scripts (``--calib_t_mode normal --calib_t_mode_normal_mean 0.4
--calib_t_mode_normal_std 0.4``, 1024 inputs); shared/docs/methods.md has no note on PTQ4DM. Note: in that code
the drawn index counts sampling-loop iterations from the noise end (so 0.4 lands at t = 0.6 T), and the network
is then given that index as t; here the paper's reading is implemented (t = 0 is the image end, the mean below
T / 2) and every input keeps the timestep it was recorded at.

Cost: PTQ4DM runs one trajectory per input. Here each trajectory gives ``per_trajectory`` inputs (independent
draws; a step drawn twice counts twice), so N inputs cost ceil(N / per_trajectory) sampling runs of the module's
own sampler, guidances and labels (class-balanced), seeds ``sample_seed(CALIBRATION_SEED, k)`` (no ``tailgen
predict`` run with a data seed below 2**30 uses them). The float network makes the trajectories; the classifier
and the unconditional network stay float32.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from tailgen.models.quantize import Batch, int8_layers, quantize_unet
from tailgen.module.sampling_data import sample_seed
from tailgen.utils import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from tailgen.module.guided import GuidedDiffusion

NDTC_MEAN, NDTC_STD = 0.4, 0.4
PER_TRAJECTORY = 8
CALIBRATION_SEED = 2**30
BATCH = 64  # trajectories sampled together, and inputs per calibration forward pass


def ndtc_steps(count: int, num_steps: int, *, mean: float = NDTC_MEAN, std: float = NDTC_STD,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` sampler step indices (0 = the last step) from PTQ4DM's normal time-step distribution."""
    u = torch.randn(count, generator=generator, dtype=torch.float64) * std + mean
    return torch.round(u.clamp(0.0, 1.0) * (num_steps - 1)).long()


class Recorder:
    """Calls ``net`` and keeps a copy of input row r at the first call whose timestep is one drawn for row r
    (once per draw). Calls on another batch size (a guidance's extra evaluations) are passed through unrecorded.
    Other attributes (``class_embedding``) are the network's."""

    def __init__(self, net: nn.Module, wanted: dict[float, list[int]], batch: int):
        self.net, self.wanted, self.batch = net, wanted, batch
        self.records: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if x.shape[0] == self.batch:
            for value in torch.unique(t).tolist():
                rows = [r for r in self.wanted.pop(value, []) if t[r].item() == value]
                if rows:
                    index = torch.tensor(rows, device=x.device)
                    self.records.append((x[index].detach().cpu(), t[index].detach().cpu(),
                                         {k: v[index].detach().cpu() if torch.is_tensor(v) else v
                                          for k, v in kwargs.items()}))
        return self.net(x, t, **kwargs)

    def __getattr__(self, name: str):
        if name == "net":
            raise AttributeError(name)
        return getattr(self.net, name)


def batches_of(records: list[tuple[torch.Tensor, torch.Tensor, dict]], size: int) -> list[Batch]:
    """Records regrouped into batches of ``size`` (records with the same keyword names go together)."""
    groups: dict[tuple, list] = defaultdict(list)
    for record in records:
        groups[tuple(sorted(record[2]))].append(record)
    out = []
    for names, group in groups.items():
        x, t = torch.cat([r[0] for r in group]), torch.cat([r[1] for r in group])
        kwargs = {name: (torch.cat([r[2][name] for r in group]) if torch.is_tensor(group[0][2][name])
                         else group[0][2][name]) for name in names}
        for k in range(0, len(x), size):
            out.append((x[k:k + size], t[k:k + size],
                        {n: v[k:k + size] if torch.is_tensor(v) else v for n, v in kwargs.items()}))
    return out


@torch.no_grad()
def collect_calibration(module: "GuidedDiffusion", count: int, *, per_trajectory: int = PER_TRAJECTORY,
                        mean: float = NDTC_MEAN, std: float = NDTC_STD, seed: int = CALIBRATION_SEED,
                        batch_size: int = BATCH) -> list[Batch]:
    """``count`` calibration inputs of ``module.net`` (CPU tensors, in batches of ``batch_size``) recorded while
    ``module`` samples with its float network (see the module doc)."""
    if count < 1 or per_trajectory < 1:
        raise ConfigError(f"calibration must be >= 1 input (got {count})")
    process = module.process
    trajectories = math.ceil(count / per_trajectory)
    steps = ndtc_steps(count, process.num_steps, mean=mean, std=std, generator=torch.Generator().manual_seed(seed))
    num_classes = module.num_classes
    labels = torch.arange(trajectories) % num_classes if num_classes is not None else None
    seeds = torch.tensor([sample_seed(seed, k) for k in range(trajectories)])
    records = []
    for start in range(0, trajectories, batch_size):
        rows = range(start, min(start + batch_size, trajectories))
        wanted: dict[float, list[int]] = defaultdict(list)
        for j in range(count):  # draw j belongs to trajectory j mod trajectories
            if j % trajectories in rows:
                t = process.model_timesteps(int(steps[j]), 1, "cpu")[0].item()
                wanted[t].append(j % trajectories - start)
        recorder = Recorder(module.net, wanted, len(rows))
        with module.sampling_with(recorder):  # the float network, eager, float32, no progress display
            module.sample(None if labels is None else labels[rows.start:rows.stop].to(module.device),
                          seeds[rows.start:rows.stop])
        records += recorder.records
    return batches_of(records, batch_size)


def int8_network(module: "GuidedDiffusion") -> nn.Module:
    """The int8 copy of ``module.net``, calibrated on ``module.calibration`` inputs (CPU only)."""
    if module.device.type != "cpu":
        raise ConfigError(f"quantize: int8 runs on the CPU only (oneDNN int8 kernels), this run is on "
                          f"{module.device}: drop model.init_args.quantize or run on the CPU")
    if getattr(module, "low_res_shape", None) is not None:
        raise ConfigError("quantize: int8 calibrates by sampling without inputs of its own, and an upsampler needs "
                          "low_res images: drop model.init_args.quantize for upsamplers")
    calibration = collect_calibration(module, module.calibration)
    quantized = quantize_unet(module.net, calibration)
    rank_zero_info(f"quantize: int8 UNet ({len(int8_layers(quantized))} int8 convolutions) calibrated on "
                   f"{sum(len(b[0]) for b in calibration)} inputs")
    return quantized
