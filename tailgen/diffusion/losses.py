"""Training objectives of the diffusion model and of its noisy classifier. Plain PyTorch; the trainers in
``tailgen.module.train`` call them. The networks are called through the sampling adapters (``ADMDenoiser``,
``NoisyClassifier``), so a network is trained on exactly the inputs it is sampled with: original timesteps
(``t * 1000 / N`` under ``rescale_timesteps``), the learned-variance channels split off, ``predict_xstart``
outputs recognised.

:func:`hybrid_loss` -- IDDPM hybrid loss (Nichol & Dhariwal 2021, Sec. 3.1). For x0 ~ data, i ~ U{0..N-1},
eps ~ N(0, I), x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps:

    L_simple = mean_dims || eps - eps_theta(x_i, i, y) ||^2           (eps-prediction networks)
             = mean_dims || x0 - x0_theta(x_i, i, y) ||^2             (predict_xstart networks; guided-diffusion
                                                                        ModelMeanType.START_X)
    L_vlb    = KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i))  (i > 0),  -log p(x0 | x_1) discretized (i = 0),
               in bits per dimension; p's mean is built from sg[x0_hat] (stop-gradient: only the variance output
               v learns from L_vlb) and log Sigma = f log beta_i + (1 - f) log beta~_i, f = (v + 1) / 2
    L_hybrid = L_simple + lambda L_vlb          (L_vlb only for learned-sigma networks)

:func:`entropy_constrained_loss` -- ECT, entropy-constraint training of the noisy classifier (Li, Zheng et al.,
"Entropy-driven Sampling and Training Scheme for Conditional Diffusion Generation", ECCV 2022, arXiv 2206.11474;
code github.com/ZGCTroy/guided-diffusion ``classifier_train.py``, flags ``use_uncertainty_loss`` /
``uncertainty_lambda``). With p = softmax(logits) over C classes and H(p) = -sum_c p_c log p_c:

    L_ECT = CE(y, p) + lambda (log C - H(p)) = CE(y, p) + lambda KL(p || Uniform_C)

averaged over the batch. The penalty keeps the classifier from becoming confident on very noisy x_t, where its
gradient would otherwise vanish early in sampling; the released ImageNet classifier used lambda = 0.1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tailgen.diffusion.adapters import ADMDenoiser
from tailgen.diffusion.process import Index


def hybrid_loss(denoiser: ADMDenoiser, x0: torch.Tensor, i: Index, noise: torch.Tensor,
                labels: torch.Tensor | None = None, vlb_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-sample ``mse`` (L_simple), ``vb`` (L_vlb in bits/dim; zeros without a learned variance) and
    ``loss`` = mse + vlb_weight * vb, all [B]; ``i`` are indices of ``denoiser.process`` (int64 [B])."""
    p = denoiser.process
    x_t = p.q_sample(x0, i, noise)
    pred = denoiser(x_t, i, labels)
    if pred.x0 is not None:
        mse = (pred.x0 - x0).pow(2).flatten(1).mean(1)
    else:
        mse = (pred.eps - noise).pow(2).flatten(1).mean(1)
    if pred.log_var is not None:
        x0_hat = pred.x0.detach() if pred.x0 is not None else p.x0_from_eps(x_t, i, pred.eps.detach())
        vb = p.vlb_term(x0, x_t, i, x0_hat, pred.log_var)
    else:
        vb = torch.zeros(x0.shape[0], device=x0.device)
    return {"mse": mse, "vb": vb, "loss": mse + vlb_weight * vb}


def entropy_gap(logits: torch.Tensor) -> torch.Tensor:
    """log C - H(softmax(logits)) per sample, [B]: KL(p || Uniform_C) in nats, 0 for a uniform prediction and
    log C for a one-hot one."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return math.log(logits.shape[-1]) + (log_p.exp() * log_p).sum(-1)


def entropy_constrained_loss(logits: torch.Tensor, labels: torch.Tensor, ect_lambda: float = 0.0,
                             label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Batch means: ``ce`` = CE(y, p) (with ``label_smoothing``), ``entropy_gap`` = log C - H(p) and ``loss`` =
    ce + ect_lambda * entropy_gap (ECT; ``ect_lambda = 0`` is plain cross-entropy, bit for bit)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    gap = entropy_gap(logits.detach() if ect_lambda == 0 else logits).mean()
    return {"ce": ce, "entropy_gap": gap, "loss": ce + ect_lambda * gap if ect_lambda else ce}


__all__ = ["hybrid_loss", "entropy_gap", "entropy_constrained_loss"]
