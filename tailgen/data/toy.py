"""The 2-D class-conditional toy mixture of ``docs/toy-study.md`` section 1.

Three classes c = 0, 1, 2 with class angle theta_c = 90 deg + 120 deg * c. Each class is a mixture of three
isotropic Gaussians (world units):

=========  =====================================  =====  ===========
mode kind  centre                                 sigma  share in c
=========  =====================================  =====  ===========
D (0)      radius 4.0 at theta_c                  0.5    0.90
A (1)      radius 6.0 at theta_c - 35 deg         0.3    0.07   "far out", class-typical direction
B (2)      radius 3.2 at theta_c + 68 deg         0.3    0.03   "ambiguous", 3.2 from D of class c+1
=========  =====================================  =====  ===========

Networks work in **model units** = world / 3 (data std ~ 1). Every function here takes and returns model
units unless it says ``world``. A global mode id is ``3 * c + kind``; ``OFF = -1`` marks a point farther
than 3 sigma (in that mode's sigma) from every mode. For a 2-D Gaussian P(r > 3 sigma) = exp(-9/2) = 1.11 %,
so a perfect sampler shows ~1.1 % off-manifold and in-mode shares scaled by 0.989 (:func:`expected_shares`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

NUM_CLASSES = 3
SCALE = 3.0  # model units = world / SCALE
KINDS = ("D", "A", "B")
SHARES = (0.90, 0.07, 0.03)
SIGMAS = (0.5, 0.3, 0.3)
_RADII = (4.0, 6.0, 3.2)
_OFFSETS_DEG = (0.0, -35.0, 68.0)
OFF = -1
OFF_RADIUS = 3.0  # in units of the mode's sigma

TRUE_SHARES = {"dominant": SHARES[0], "rareA": SHARES[1], "rareB": SHARES[2]}


def _mode_table() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centres_world (9, 2), sigmas_world (9,), class_of_mode (9,), kind_of_mode (9,)); id = 3c + kind."""
    centres, sig, cls, kind = [], [], [], []
    for c in range(NUM_CLASSES):
        theta = 90.0 + 120.0 * c
        for k in range(3):
            a = math.radians(theta + _OFFSETS_DEG[k])
            centres.append((_RADII[k] * math.cos(a), _RADII[k] * math.sin(a)))
            sig.append(SIGMAS[k])
            cls.append(c)
            kind.append(k)
    return (torch.tensor(centres, dtype=torch.float64), torch.tensor(sig, dtype=torch.float64),
            torch.tensor(cls), torch.tensor(kind))


CENTRES_WORLD, SIGMAS_WORLD, MODE_CLASS, MODE_KIND = _mode_table()


def sample(n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``n`` points of the true distribution: ``(x float32 (n, 2) model units, labels int64, mode_ids int64)``.

    ``labels=None`` draws labels uniformly; otherwise ``labels`` (n,) fixes the class of each point. The mode
    within the class is drawn with probabilities (0.90, 0.07, 0.03), then x = mu + sigma * z (world units),
    divided by :data:`SCALE`.
    """
    if labels is None:
        labels = torch.randint(NUM_CLASSES, (n,), generator=generator)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"labels has {labels.numel()} entries, expected n={n}")
    kind = torch.multinomial(torch.tensor(SHARES, dtype=torch.float64), n, replacement=True, generator=generator)
    mode = 3 * labels + kind
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x = CENTRES_WORLD[mode] + SIGMAS_WORLD[mode, None] * z
    return (x / SCALE).float(), labels, mode


def assign_modes(x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest mode in that mode's sigma units (Mahalanobis for isotropic modes); ``OFF`` beyond 3 sigma.

    The assignment does not depend on the label (``labels`` is accepted for call symmetry and ignored;
    compare with ``MODE_CLASS[ids]`` to find wrong-class points).

    ``x`` is (n, 2) in model units. Returns global mode ids (n,) int64 in {-1, 0..8}. The modes are separated
    by > 1.35 x the sum of their 3-sigma radii, so at most one mode is within 3 sigma of any point.
    """
    xw = torch.as_tensor(x, dtype=torch.float64) * SCALE
    d = torch.cdist(xw, CENTRES_WORLD) / SIGMAS_WORLD  # (n, 9) distances in sigma units
    dmin, idx = d.min(dim=1)
    return torch.where(dmin <= OFF_RADIUS, idx, torch.full_like(idx, OFF))


def mode_shares(x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Toy-study shares of samples ``x`` (model units) generated for ``labels``.

    * ``dominant`` / ``rareA`` / ``rareB``: share of class c's samples in class c's own D / A / B mode,
      averaged over the classes present;
    * ``off``: share more than 3 sigma from every mode (pooled);
    * ``wrong_class``: share inside a mode of another class (pooled).
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    m = assign_modes(x)
    on = m != OFF
    mc = torch.where(on, MODE_CLASS[m.clamp(min=0)], torch.full_like(m, -1))
    mk = torch.where(on, MODE_KIND[m.clamp(min=0)], torch.full_like(m, -1))
    own = on & (mc == labels)
    out = {}
    for name, k in (("dominant", 0), ("rareA", 1), ("rareB", 2)):
        per_class = [((own & (mk == k) & (labels == c)).sum() / (labels == c).sum()).item()
                     for c in range(NUM_CLASSES) if (labels == c).any()]
        out[name] = float(np.mean(per_class))
    out["off"] = (~on).double().mean().item()
    out["wrong_class"] = (on & (mc != labels)).double().mean().item()
    return out


def expected_shares() -> dict[str, float]:
    """What :func:`mode_shares` gives on the true distribution (in-mode shares lose the 1.11 % beyond 3 sigma)."""
    inside = 1.0 - math.exp(-OFF_RADIUS ** 2 / 2)
    return {"dominant": SHARES[0] * inside, "rareA": SHARES[1] * inside, "rareB": SHARES[2] * inside,
            "off": 1.0 - inside, "wrong_class": 0.0}


def scatter_png(path, x: torch.Tensor, labels: torch.Tensor, title: str = "", max_points: int = 7000,
                reference: bool = True) -> None:
    """Write a scatter plot (world units) of samples coloured by label, with the 3-sigma mode circles and the
    per-class shares in the title. Uses the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.as_tensor(x).double()
    labels = torch.as_tensor(labels)
    shares = mode_shares(x, labels)
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
    xw = (x[keep] * SCALE).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    colors = ("tab:blue", "tab:orange", "tab:green")
    for c in range(NUM_CLASSES):
        sel = labels[keep].numpy() == c
        ax.scatter(xw[sel, 0], xw[sel, 1], s=2, alpha=0.4, color=colors[c], label=f"class {c}")
    if reference:
        for j in range(CENTRES_WORLD.shape[0]):
            cx, cy = CENTRES_WORLD[j].tolist()
            r = OFF_RADIUS * SIGMAS_WORLD[j].item()
            ax.add_patch(plt.Circle((cx, cy), r, fill=False, lw=0.8, color=colors[int(MODE_CLASS[j])],
                                    ls="-" if MODE_KIND[j] == 0 else "--"))
            ax.annotate(KINDS[int(MODE_KIND[j])], (cx, cy), fontsize=7, ha="center", va="center")
    ax.set_aspect("equal")
    ax.set_xlim(-7.5, 7.5)
    ax.set_ylim(-7.5, 7.5)
    ax.set_title(f"{title}\nrareA {100 * shares['rareA']:.1f}% (7)  rareB {100 * shares['rareB']:.2f}% (3)  "
                 f"off {100 * shares['off']:.2f}%", fontsize=9)
    ax.legend(loc="lower right", fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
