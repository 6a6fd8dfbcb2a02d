"""Comparing a method against a reference trade-off curve (e.g. ADM-G at several scales).

A guidance that only weakens classifier guidance lands *on* the ADM-G scale curve; a useful tail method lies
*above* it: at the same fidelity F (class accuracy, FID, ...) it has more diversity D (recall, coverage, rarity).
The rule, fixed in docs/tail_study/PROTOCOL.md before the study ran:

* the curve's points (F_i, D_i) are taken in the order of the curve's own parameter (the guidance scale), and
  D is interpolated piecewise-linearly in F on every segment [F_i, F_i+1] that contains F(C);
* F need not be monotone in the scale (FID is U-shaped): where several segments reach F(C), the reference is the
  **largest** interpolated D (the conservative choice);
* a candidate outside the F range of the curve is not comparable;
* C is above the curve when D(C) - D_ref(F(C)) > k sigma_D for every diversity metric D (k = 2 by default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def curve_value(curve_f: Sequence[float], curve_d: Sequence[float], f: float) -> float | None:
    """The conservative reference D_ref(f) of a curve given point by point in its parameter's order.

    Returns None when ``f`` lies outside every segment (outside the curve's fidelity range) or is not finite.
    A single-point curve is comparable only at exactly its own F.
    """
    fs, ds = np.asarray(curve_f, dtype=float), np.asarray(curve_d, dtype=float)
    if fs.shape != ds.shape or fs.ndim != 1 or not len(fs):
        raise ValueError("curve_f and curve_d must be 1-D sequences of the same, non-zero length")
    if not math.isfinite(f):
        return None
    if len(fs) == 1:
        return float(ds[0]) if f == fs[0] else None
    best = None
    for (f0, f1), (d0, d1) in zip(zip(fs[:-1], fs[1:]), zip(ds[:-1], ds[1:])):
        lo, hi = min(f0, f1), max(f0, f1)
        if not (lo <= f <= hi):
            continue
        d = max(d0, d1) if f1 == f0 else d0 + (d1 - d0) * (f - f0) / (f1 - f0)
        best = d if best is None else max(best, d)
    return None if best is None else float(best)


def margin_over_curve(curve: Sequence[Mapping[str, float]], candidate: Mapping[str, float], fidelity: str,
                      diversity: Sequence[str], sigma: Mapping[str, float], k: float = 2.0) -> dict:
    """Where ``candidate`` stands against ``curve`` (points in parameter order, each a metrics mapping).

    Returns ``{"comparable", "reference": {D: D_ref}, "margin": {D: D(C) - D_ref}, "z": {D: margin / sigma_D},
    "above": bool}``; ``above`` needs every diversity metric's margin above ``k * sigma_D``.
    """
    f = float(candidate[fidelity])
    reference, margin, z = {}, {}, {}
    for name in diversity:
        ref = curve_value([p[fidelity] for p in curve], [p[name] for p in curve], f)
        if ref is None:
            return {"comparable": False, "reference": {}, "margin": {}, "z": {}, "above": False}
        reference[name] = ref
        margin[name] = float(candidate[name]) - ref
        s = float(sigma[name])
        z[name] = margin[name] / s if s > 0 else math.copysign(math.inf, margin[name]) if margin[name] else 0.0
    above = all(z[name] > k for name in diversity)
    return {"comparable": True, "reference": reference, "margin": margin, "z": z, "above": above}


__all__ = ["curve_value", "margin_over_curve"]
