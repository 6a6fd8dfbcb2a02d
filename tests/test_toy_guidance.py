"""Guidance claims on the shipped toy weights (tools/toy_study.run_config, seed 0, 100 DDPM steps as in
docs/toy_results.md; at 50 steps the fixed-variance sampler itself under-disperses rare B: 2.2 vs 3.1 % on 6000
unguided samples). The unguided shares use 4000 samples, the guided comparisons the first 1500 (same seeds: paired).

Shares are per-class averages of n/3 samples per class, so their binomial std is sqrt(p (1 - p) / n):
rareA 0.40 / 0.66 pp, rareB 0.27 / 0.44 pp at n = 4000 / 1500. Seeds are fixed, so the tests are deterministic;
the margins are there so that a retrained model of the same quality passes and a biased one does not.
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tailgen.data import toy
from tailgen.guidance import ClassifierGuidance, LowDensityGuidance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from toy_study import run_config  # noqa: E402

N, N_UNCOND, STEPS, SEED = 1500, 4000, 100, 0
CONFIGS = {
    "uncond": lambda: {},
    "admg_s2": lambda: {"admg": ClassifierGuidance(scale=2.0)},
    "target_k2": lambda: {"tail": LowDensityGuidance("target", target_confidence=0.5, scale=2.0)},
}


def binomial_std(p: float, n: int = N) -> float:
    return math.sqrt(p * (1 - p) / n)


# Under-dispersion allowance: the unguided toy model puts slightly less mass in the rare modes than the data
# (toy-study.md: 6.3 vs 7 % and 2.6 vs 3 %; the shipped model: see docs/toy_results.md). Allowed range:
# [expected - allowance - 3 std, expected + 3 std] (the model is not expected to over-sample a rare mode).
UNDER_DISPERSION = {"rareA": 0.010, "rareB": 0.005}


def allowed(kind: str, n: int = N_UNCOND) -> tuple[float, float]:
    e = toy.expected_shares()[kind]
    return e - UNDER_DISPERSION[kind] - 3 * binomial_std(e, n), e + 3 * binomial_std(e, n)


@lru_cache(maxsize=None)
def samples(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of config ``name`` (N_UNCOND for the unguided model, else N), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_config(name, CONFIGS[name](), num_samples=N_UNCOND if name == "uncond" else N, steps=STEPS,
                          seed=SEED)
    finally:
        torch.set_num_threads(threads)


def shares(name: str, n: int = N) -> dict[str, float]:
    """Mode shares of the first ``n`` samples of ``name`` (per-sample seeds: the same points in every config)."""
    x, labels = samples(name)
    return toy.mode_shares(x[:n], labels[:n])


@pytest.mark.parametrize("kind", ["rareA", "rareB"])
def test_unguided_rare_shares_match_truth(kind):
    lo, hi = allowed(kind)
    got = shares("uncond", N_UNCOND)[kind]
    assert lo <= got <= hi, (kind, got, lo, hi)


def test_unguided_is_on_manifold():
    s = shares("uncond", N_UNCOND)
    assert s["off"] < 0.03 and s["wrong_class"] < 0.005, s


def test_tolerance_rejects_adm_guided_shares():
    # the rareB range is tight enough to flag the mode collapse of ADM-G s=2 (with room to spare)
    lo, _ = allowed("rareB", N)
    assert shares("admg_s2")["rareB"] < lo - 2 * binomial_std(lo), (shares("admg_s2")["rareB"], lo)


def test_admg_lowers_ambiguous_rare_mode():
    b0, b2 = shares("uncond")["rareB"], shares("admg_s2")["rareB"]
    assert b2 < 0.5 * b0 and b0 - b2 > 3 * binomial_std(b0), (b0, b2)


def test_target_confidence_restores_rare_b_above_admg():
    b_adm, b_tgt = shares("admg_s2")["rareB"], shares("target_k2")["rareB"]
    assert b_tgt - b_adm > 3 * binomial_std(b_tgt), (b_adm, b_tgt)
