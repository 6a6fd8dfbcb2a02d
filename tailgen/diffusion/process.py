"""The Gaussian diffusion process: every coefficient a sampler or a loss needs, over respaced indices.

Holds float64 numpy arrays indexed by the *respaced* index i = 0..K-1 (ADM ``SpacedDiffusion``), and
``timestep_map[i]`` = the original step the networks were trained on. Each coefficient is gathered in float64 and
cast to float32 right before it multiplies a tensor, which is what makes trajectories match the reference bit for bit.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021): ``abar_i = prod_{j<=i} (1 - beta_j)``,
``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``, posterior ``q(x_{i-1} | x_i, x0) = N(c1 x0 + c2 x_i, beta~_i)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tailgen.diffusion.schedules import get_named_beta_schedule, respace_betas, space_timesteps
from tailgen.models.adm import DIFFUSION_DEFAULTS, NETWORK_FLAGS, SAMPLING_FLAGS
from tailgen.utils.errors import ConfigError

Index = int | torch.Tensor

# Flags of guided-diffusion's sampling scripts: accepted by from_flags and ignored, like every network flag, so one
# pasted flag dict works. The diffusion flags and their defaults are defined once, in tailgen.models.adm.
SCRIPT_FLAGS = frozenset("clip_denoised num_samples batch_size use_ddim model_path classifier_path base_samples".split())
IGNORED_FLAGS = (NETWORK_FLAGS | SAMPLING_FLAGS | SCRIPT_FLAGS) - set(DIFFUSION_DEFAULTS)


@dataclass(frozen=True, eq=False)
class DiffusionProcess:
    """Discrete VP diffusion over the kept timesteps (see module docstring).

    Build with :meth:`from_flags` (guided-diffusion flag names) or directly from a beta schedule.
    """

    base_betas: np.ndarray
    timestep_respacing: str = ""
    learn_sigma: bool = False
    sigma_small: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    use_kl: bool = False
    rescale_learned_sigmas: bool = False
    timestep_map: np.ndarray = field(init=False)
    betas: np.ndarray = field(init=False)

    def __post_init__(self):
        base = np.asarray(self.base_betas, dtype=np.float64)
        if base.ndim != 1 or not np.all((base > 0) & (base <= 1)):
            raise ConfigError("betas must be a 1-D array with values in (0, 1]")
        kept = space_timesteps(len(base), self.timestep_respacing)
        set_ = object.__setattr__
        set_(self, "base_betas", base)
        set_(self, "timestep_map", np.array(kept, dtype=np.int64))
        set_(self, "betas", respace_betas(base, kept))
        b = self.betas
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        derived = {
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            # beta~_0 = 0: the log is clipped by repeating entry 1 (as the reference).
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:]) if len(b) > 1 else b),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
            "log_betas": np.log(b),
            # "fixed large" variance: beta, except beta~_1 at i = 0 (as the reference).
            "fixed_large_variance": np.append(post_var[1], b[1:]) if len(b) > 1 else b.copy(),
        }
        derived["fixed_large_log_variance"] = np.log(derived["fixed_large_variance"])
        for name, arr in derived.items():
            set_(self, name, arr)

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_flags(cls, **flags) -> "DiffusionProcess":
        """Build from guided-diffusion's flags (``create_gaussian_diffusion``); model flags are ignored.

        Accepts ``diffusion_steps, learn_sigma, sigma_small, noise_schedule, use_kl, predict_xstart,
        rescale_timesteps, rescale_learned_sigmas, timestep_respacing`` with the reference defaults.
        """
        unknown = sorted(set(flags) - set(DIFFUSION_DEFAULTS) - IGNORED_FLAGS)
        if unknown:
            raise ConfigError(
                f"unknown diffusion flag(s) {', '.join(unknown)}: expected guided-diffusion names "
                f"({', '.join(DIFFUSION_DEFAULTS)})"
            )
        f = {**DIFFUSION_DEFAULTS, **{k: v for k, v in flags.items() if k in DIFFUSION_DEFAULTS}}
        steps = f["diffusion_steps"]
        if isinstance(steps, str) and steps.strip().isdigit():
            steps = int(steps)
        respacing = f["timestep_respacing"]
        if respacing is None:
            respacing = ""
        return cls(
            get_named_beta_schedule(f["noise_schedule"], steps),
            timestep_respacing=respacing if isinstance(respacing, str) else ",".join(map(str, respacing)),
            learn_sigma=bool(f["learn_sigma"]),
            sigma_small=bool(f["sigma_small"]),
            predict_xstart=bool(f["predict_xstart"]),
            rescale_timesteps=bool(f["rescale_timesteps"]),
            use_kl=bool(f["use_kl"]),
            rescale_learned_sigmas=bool(f["rescale_learned_sigmas"]),
        )

    # ------------------------------------------------------------------------------------------------ indexing

    @property
    def num_steps(self) -> int:
        """K, the number of respaced steps."""
        return len(self.betas)

    @property
    def num_train_steps(self) -> int:
        """N, the number of steps of the original (training) process."""
        return len(self.base_betas)

    @property
    def num_timesteps(self) -> int:
        """T = N, the original process length (so ``tau = t / T`` with t an original index lies in [0, 1))."""
        return len(self.base_betas)

    def original_t(self, i: Index, batch: int | None = None, device=None) -> torch.Tensor:
        """Original timesteps ``timestep_map[i]`` as int64 [B] (what the networks receive)."""
        if isinstance(i, torch.Tensor):
            return torch.from_numpy(self.timestep_map).to(i.device)[i.long()]
        return torch.full((batch or 1,), int(self.timestep_map[i]), dtype=torch.int64, device=device)

    def model_timesteps(self, i: Index, batch: int | None = None, device=None) -> torch.Tensor:
        """What the networks receive: original t (int64), or float ``t * 1000 / N`` under ``rescale_timesteps``."""
        t = self.original_t(i, batch, device)
        return t.float() * (1000.0 / self.num_train_steps) if self.rescale_timesteps else t

    def coef(self, name: str, i: Index, x: torch.Tensor) -> torch.Tensor:
        """``self.<name>[i]`` as float32 on x's device, broadcastable against x (0-d for int i, [B,1,..] for [B])."""
        arr = getattr(self, name)
        if isinstance(i, torch.Tensor):
            vals = torch.from_numpy(arr).to(x.device)[i.long()].float()
            return vals.view(-1, *([1] * (x.dim() - 1)))
        return torch.tensor(float(arr[i]), dtype=torch.float32, device=x.device)

    def alpha_bar(self, i: Index, x: torch.Tensor) -> torch.Tensor:
        """abar_i (float32, broadcastable against x)."""
        return self.coef("alphas_cumprod", i, x)

    def alpha_bar_prev(self, i: Index, x: torch.Tensor) -> torch.Tensor:
        """abar_{i-1}, with abar_{-1} = 1."""
        return self.coef("alphas_cumprod_prev", i, x)

    def sigma(self, i: Index, x: torch.Tensor) -> torch.Tensor:
        """sqrt(1 - abar_i): the noise level of x_t in VP form."""
        return self.coef("sqrt_one_minus_alphas_cumprod", i, x)

    def lambda_(self, i: int) -> float:
        """log(alpha_i / sigma_i) in float64 (DPM-Solver's half log-SNR); +inf past the end (i = -1, clean data)."""
        if i < 0:
            return math.inf
        ac = float(self.alphas_cumprod[i])
        return 0.5 * (math.log(ac) - math.log1p(-ac))

    # ------------------------------------------------------------------------------------------------ conversions

    def x0_from_eps(self, x: torch.Tensor, i: Index, eps: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps."""
        return self.coef("sqrt_recip_alphas_cumprod", i, x) * x - self.coef("sqrt_recipm1_alphas_cumprod", i, x) * eps

    def eps_from_x0(self, x: torch.Tensor, i: Index, x0: torch.Tensor) -> torch.Tensor:
        """eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1)."""
        return (self.coef("sqrt_recip_alphas_cumprod", i, x) * x - x0) / self.coef("sqrt_recipm1_alphas_cumprod", i, x)

    def q_sample(self, x0: torch.Tensor, i: Index, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_i | x0): sqrt(abar) x0 + sqrt(1 - abar) noise."""
        return self.coef("sqrt_alphas_cumprod", i, x0) * x0 + self.coef("sqrt_one_minus_alphas_cumprod", i, x0) * noise

    def posterior_mean(self, x0: torch.Tensor, x: torch.Tensor, i: Index) -> torch.Tensor:
        """Mean of q(x_{i-1} | x_i, x0) = c1 x0 + c2 x_i."""
        return self.coef("posterior_mean_coef1", i, x) * x0 + self.coef("posterior_mean_coef2", i, x) * x

    def posterior_log_variance(self, i: Index, x: torch.Tensor) -> torch.Tensor:
        """Clipped log beta~_i of q(x_{i-1} | x_i, x0)."""
        return self.coef("posterior_log_variance_clipped", i, x)

    # ------------------------------------------------------------------------------------------------ variances

    def model_log_variance(self, i: Index, v: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """log Sigma of p(x_{i-1} | x_i).

        Learned (``v`` given, IDDPM Eq. 15): ``f log beta + (1 - f) log beta~`` with ``f = (v + 1) / 2`` (v raw,
        not clamped). Fixed: log beta~ (``sigma_small``) or log beta with beta~_1 at i = 0 ("fixed large").
        """
        if v is not None:
            max_log, min_log = self.coef("log_betas", i, x), self.coef("posterior_log_variance_clipped", i, x)
            frac = (v + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        name = "posterior_log_variance_clipped" if self.sigma_small else "fixed_large_log_variance"
        return self.coef(name, i, x).expand_as(x)

    def model_variance(self, i: Index, log_var: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Sigma itself: ``exp(log_var)`` for a learned variance, the float64 table entry for a fixed one."""
        if log_var is not None:
            return torch.exp(log_var)
        name = "posterior_variance" if self.sigma_small else "fixed_large_variance"
        return self.coef(name, i, x).expand_as(x)

    # ------------------------------------------------------------------------------------------------ training terms

    def vlb_term(
        self, x0: torch.Tensor, x_t: torch.Tensor, i: Index, x0_hat: torch.Tensor, log_var: torch.Tensor
    ) -> torch.Tensor:
        """IDDPM L_vlb term per sample, in bits: [B].

        KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)) averaged over dimensions, or at i = 0 the decoder NLL
        ``-log p(x0 | x_1)`` with the discretized Gaussian likelihood (256 bins on [-1, 1]); p has mean
        ``posterior_mean(x0_hat, x_t)`` and log variance ``log_var`` (the model's log Sigma, e.g.
        ``Prediction.log_var``). As in IDDPM's hybrid loss, pass ``x0_hat`` detached so only the variance output
        learns from this term. Training never clips x0_hat.
        """
        true_mean = self.posterior_mean(x0, x_t, i)
        true_log_var = self.posterior_log_variance(i, x_t)
        mean = self.posterior_mean(x0_hat, x_t, i)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
        first = (i == 0) if isinstance(i, torch.Tensor) else torch.full_like(kl, i == 0, dtype=torch.bool)
        return torch.where(first.to(kl.device), nll, kl)

    def __repr__(self) -> str:
        return (
            f"DiffusionProcess(N={self.num_train_steps}, K={self.num_steps}, "
            f"respacing={self.timestep_respacing!r}, learn_sigma={self.learn_sigma}, sigma_small={self.sigma_small}, "
            f"predict_xstart={self.predict_xstart}, rescale_timesteps={self.rescale_timesteps})"
        )


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation of Phi (Page 1977), as used by IDDPM's decoder likelihood.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of 8-bit data x in [-1, 1] under N(means, e^{2 log_scales}) integrated over each 2/255 bin.

    The edge bins extend to -inf / +inf (Ho et al. 2020, Sec. 3.3).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
