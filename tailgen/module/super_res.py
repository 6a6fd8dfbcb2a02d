"""Training a cascade's second stage: a class-conditional super-resolution diffusion model (``tailgen fit --config
configs/fashion/train_upsampler_14_28.yaml``).

ADM's super-resolution recipe (Dhariwal & Nichol 2021; guided-diffusion ``super_res_train.py``): the network is a
``SuperResModel`` (a UNet on [x_t, bilinear_resize(low_res, x_t's size)]) and learns p(x0 | low_res, y) with the
same IDDPM hybrid loss, label dropout and EMA as :class:`~tailgen.module.train.DiffusionTrainer`. Its ``low_res``
is the training image itself, area-downsampled to ``small_size`` (ADM: ``F.interpolate(x0, small_size,
mode="area")``):

    low_res = area_downsample(x0, small_size)        (tailgen.data.resize; block means of the f x f pixels)
    L       = L_hybrid(eps_theta(x_t, t, y, low_res))  with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps

``quantize_low_res`` (default True, a tailgen choice) rounds low_res to the 256 uint8 levels, k / 127.5 - 1: the
values a cascade's sampler reads from a first stage's samples.npz, and exactly the images a first stage trained with
``FashionMNISTDataModule(image_size=small_size)`` learns. False is ADM's float low_res. Either way it is clean (never
noised) and the same tensor at every t.

low_res reaches the network the way sampling passes it: ``sampling_data.low_res_inputs`` (shape check, float32 on
the device) -> ``BoundDenoiser`` (``tailgen.sampling.run``, what ``SamplingRun`` binds) -> ``ADMDenoiser`` ->
``net(x, t, low_res=..., y=...)``.
"""

from __future__ import annotations

import torch
from torch import nn

from tailgen.data.resize import area_downsample, check_factor
from tailgen.diffusion.losses import hybrid_loss
from tailgen.module.sampling_data import low_res_inputs
from tailgen.module.train import DiffusionTrainer
from tailgen.sampling.run import BoundDenoiser
from tailgen.utils.errors import ConfigError


def superres_sizes(network: dict) -> tuple[int, int]:
    """``(large_size, small_size)`` of upsampler flags; both must be given (the builder's defaults are ImageNet's
    256 / 64, and the exported flags must name the low resolution the sampler reads) and small_size must divide
    large_size."""
    sizes = []
    for name in ("large_size", "small_size"):
        value = network.get(name)
        try:
            sizes.append(int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"model.init_args.network.{name} must be set to an integer for a super-resolution "
                              f"model (large_size: the image size, small_size: the low_res size), got {value!r}") \
                from None
    check_factor(sizes[0], sizes[1], "model.init_args.network.small_size")
    return sizes[0], sizes[1]


class SuperResTrainer(DiffusionTrainer):
    """Train an ADM upsampler on (image, its area-downsampled copy, label); see module docstring.

    Args:
        network: ``create_superres_model`` flags; ``large_size`` (= ``data.image_size``) and ``small_size`` (a
            divisor of it) are required, e.g. the ``fashion_upsampler`` preset's flags.
        quantize_low_res: round low_res to uint8 levels (the sampler's input); False: ADM's float low_res.
        **kwargs: every other :class:`~tailgen.module.train.DiffusionTrainer` argument (diffusion, num_classes,
            label_dropout, vlb_weight, lr, ema_decay, speed options...).
    """

    network_kind = "upsampler"

    def __init__(self, network: dict, quantize_low_res: bool = True, **kwargs):
        large_size, small_size = superres_sizes(network)
        if kwargs.get("arch", "adm") != "adm":
            raise ConfigError(f"model.init_args.arch: a super-resolution model is an ADM SuperResModel (arch: adm), "
                              f"got {kwargs['arch']!r}")
        super().__init__(network, **kwargs)
        self.large_size, self.small_size, self.quantize_low_res = large_size, small_size, quantize_low_res
        channels = int(network.get("in_channels", 3))
        self.low_res_shape = (channels, small_size, small_size)  # as GuidedDiffusion.low_res_shape

    def low_res(self, x0: torch.Tensor) -> torch.Tensor:
        """The conditioning image of each training image: ``area_downsample(x0, small_size, quantize_low_res)``."""
        if tuple(x0.shape[-2:]) != (self.large_size, self.large_size):
            raise ConfigError(f"the training images are {x0.shape[-2]}x{x0.shape[-1]} but the upsampler's large_size "
                              f"is {self.large_size}: set data.init_args.image_size: {self.large_size}")
        return area_downsample(x0, self.small_size, self.quantize_low_res)

    def losses(self, net: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """``DiffusionTrainer.losses`` with ``low_res`` bound into the adapter as sampling binds it."""
        model_kwargs = low_res_inputs(self.low_res(x0), self.low_res_shape, x0.shape[0], x0.device)
        return hybrid_loss(BoundDenoiser(self.denoiser(net), **model_kwargs), x0, t, noise, y, self.vlb_weight)


__all__ = ["SuperResTrainer", "superres_sizes"]
