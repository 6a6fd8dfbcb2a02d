"""Adapters that turn ADM networks into the contracts samplers, guidances and the trainers use.

ADM quirks handled here and nowhere else (Dhariwal & Nichol 2021; guided-diffusion ``respace._WrappedModel``):

* a learned-sigma UNet outputs 2C channels: eps in the first C, the raw variance interpolation v in the last C;
* under timestep respacing the networks were trained on the *original* step indices, so respaced index i is
  mapped to ``timestep_map[i]`` (int64 [B]) for the UNet **and** for the noisy classifier;
* ``predict_xstart`` models output x0, converted here to eps;
* ``rescale_timesteps`` models receive ``t * 1000 / N`` as float.

Training (``tailgen.diffusion.losses``, ``tailgen.module.train``) calls the networks through the same adapters, so
a network is trained on exactly the inputs it is later sampled with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tailgen.diffusion.process import DiffusionProcess, Index
from tailgen.utils.errors import ConfigError


@dataclass
class Prediction:
    """Raw network prediction in sampler terms: ``eps`` and, for learned-sigma models, ``log_var`` = log Sigma.

    ``x0`` is the network's own output for ``predict_xstart`` models (``eps`` is derived from it, exact up to
    rounding); None for eps-prediction models. The training loss regresses whichever the network outputs."""

    eps: torch.Tensor
    log_var: torch.Tensor | None = None
    x0: torch.Tensor | None = None


class ADMDenoiser:
    """``(x, i, labels, class_emb=None, **model_kwargs) -> Prediction`` for an ADM ``UNetModel`` / ``SuperResModel``
    (or the toy denoiser, which has the same signature).

    Holds references only (the network is not registered as a submodule). ``labels`` is passed as ``y`` when
    given; ``class_emb`` (a class embedding from ``class_embedding(labels)``, possibly changed by a guidance's
    ``guide_condition``, e.g. CADS) is passed *instead of* the labels; other keyword arguments (``low_res`` for
    the upsampler) go to the network unchanged.
    """

    def __init__(self, net, process: DiffusionProcess, learn_sigma: bool | None = None):
        self.net = net
        self.process = process
        self.learn_sigma = process.learn_sigma if learn_sigma is None else bool(learn_sigma)

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """The network's class embedding of ``labels`` (B, D): what ``class_emb`` replaces."""
        if not hasattr(self.net, "class_embedding"):
            raise ConfigError(f"{type(self.net).__name__} has no class embedding: conditioning guidances (CADS) "
                              "need a class-conditional UNetModel or ToyDenoiser")
        return self.net.class_embedding(labels)

    def __call__(self, x: torch.Tensor, i: Index, labels: torch.Tensor | None = None,
                 class_emb: torch.Tensor | None = None, **model_kwargs) -> Prediction:
        p = self.process
        t = p.model_timesteps(i, x.shape[0], x.device)
        if labels is not None and class_emb is not None:
            raise ConfigError("ADMDenoiser: pass labels or class_emb, not both")
        if labels is not None:
            model_kwargs["y"] = labels
        if class_emb is not None:
            model_kwargs["class_emb"] = class_emb
        out = self.net(x, t, **model_kwargs)
        v = None
        if self.learn_sigma:
            out, v = torch.split(out, x.shape[1], dim=1)
        log_var = None if v is None else p.model_log_variance(i, v, x)
        if p.predict_xstart:
            return Prediction(eps=p.eps_from_x0(x, i, out), log_var=log_var, x0=out)
        return Prediction(eps=out, log_var=log_var)

    def __repr__(self) -> str:
        return f"ADMDenoiser({type(self.net).__name__}, {self.process!r})"


class NoisyClassifier:
    """``(x, i) -> logits`` for a noisy-image classifier (ADM ``EncoderUNetModel``), fed the original timestep."""

    def __init__(self, net, process: DiffusionProcess):
        self.net = net
        self.process = process

    def __call__(self, x: torch.Tensor, i: Index) -> torch.Tensor:
        return self.net(x, self.process.model_timesteps(i, x.shape[0], x.device))

    def __repr__(self) -> str:
        return f"NoisyClassifier({type(self.net).__name__}, {self.process!r})"
