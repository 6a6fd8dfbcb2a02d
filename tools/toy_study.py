"""Toy tail-guidance study: sample the shipped 2-D toy model under a named grid of guidance configs.

    python tools/toy_study.py [--out outputs/toy_study] [--num-samples 6000] [--steps 100] [--seed 0]
                              [--configs uncond admg_s2 ...]

Every config samples ``num_samples`` points (labels ``i mod 3``) through ``GuidedDiffusion`` (DDPM, fixed
variance of the shipped preset, x0_hat not clipped: toy data exceed [-1, 1]) with the same per-sample seeds
(shared noise bank). Metrics per config (:func:`evaluate`): rare-mode shares, off-manifold / wrong-class
share, Bayes-rule and noisy-classifier (t=0) accuracy, pooled P/R (k=3) and D/C (k=5) against a held-out real
set of the same size, R/C restricted to rare-mode real points, pooled FD and class-conditional FD (cFD).
Writes ``results.json``, ``results.md``, ``samples.npz`` and plots (``tools/toy_study_report.py``).

"Best" configs follow :data:`RULE`, fixed before any guided result was seen (see :func:`select_best`).
Tests call :func:`run_config` directly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tailgen.data import toy
from tailgen.guidance import (ClassifierFreeGuidance, ClassifierGuidance, Guidance, LowDensityGuidance,
                              PredictedImageGradient, PredictedImagePull)
from tailgen.metrics.fid import frechet_distance_features
from tailgen.metrics.manifold import manifold_masks, prdc
from tailgen.models.spec import NetworkSpec
from tailgen.module.guided import GuidedDiffusion

DENOISER, CLASSIFIER = "toy_denoiser", "toy_classifier"
REAL_SEED_OFFSET = 1000  # real sets are drawn with generators seeded 1000 + seed (ref) and 2000 + seed (real #2)

# Pre-registered selection rule (written before any guided result was measured): among the candidates, the
# highest C rare subject to P >= P(uncond) - dP, off <= off(uncond) + dOff, Bayes acc >= acc(uncond) - dAcc;
# C rare values within `tie` of the best are ties, broken by the lower cFD.
RULE = {"dP": 0.02, "dOff": 0.01, "dAcc": 0.01, "tie": 0.003}
TAIL_FAMILIES = ("(a) comp", "(b) neg", "(c) entropy", "(d) damped", "(e) target")
PULLS = {"f": "pull", "g": "snr_pull", "h": "renoise"}
ETAS = (0.02, 0.1)

Factory = Callable[[], dict[str, Guidance]]


# ------------------------------------------------------------------------------------------------ grid


def grid(null_label: int | None) -> dict[str, tuple[str, Factory]]:
    """Base configs ``name -> (family, factory of fresh guidances)``; CFG only when the denoiser has a null label."""
    g: dict[str, tuple[str, Factory]] = {"uncond": ("base", lambda: {})}
    for s in (1, 2, 4):
        g[f"admg_s{s}"] = ("ADM-G", lambda s=s: {"admg": ClassifierGuidance(scale=s)})
    if null_label is not None:
        for w in (0.5, 2):
            g[f"cfg_w{w}"] = ("CFG", lambda w=w: {"cfg": ClassifierFreeGuidance(scale=w, null_label=null_label)})
    for lam in (0.5, 1):
        for tag, kw in (("", {}), ("_cap1", {"max_norm": 1.0}), ("_t0.2", {"t_min": 0.2}),
                        ("_cap1_t0.2", {"max_norm": 1.0, "t_min": 0.2})):
            g[f"a_comp_s1_l{lam}{tag}"] = ("(a) comp", lambda lam=lam, kw=kw: {
                "tail": LowDensityGuidance("complement", lam=lam, scale=1.0, **kw)})
    for s in (0.5, 1):
        g[f"b_neg_s{s}"] = ("(b) neg", lambda s=s: {"tail": LowDensityGuidance("negative", scale=s)})
    for lam in (1, 2):
        g[f"c_ent_s1_l{lam}"] = ("(c) entropy", lambda lam=lam: {
            "tail": LowDensityGuidance("entropy", lam=lam, scale=1.0)})
    for s in (2, 4):
        g[f"d_damp_s{s}_g1"] = ("(d) damped", lambda s=s: {"tail": LowDensityGuidance("damped", gamma=1, scale=s)})
    for form in ("mean", "pre"):
        for k in (2, 8):
            g[f"e_target_k{k}_c0.5_{form}"] = ("(e) target", lambda k=k, form=form: {
                "tail": LowDensityGuidance("target", target_confidence=0.5, scale=k, form=form)})
    for key, variant in PULLS.items():
        for eta in ETAS:
            g[f"x0{key}_eta{eta}"] = (f"x0 ({key})", lambda variant=variant, eta=eta: {
                "x0": PredictedImagePull(variant, scale=eta)})
    for s in (1, 4):
        g[f"i_norm_s{s}"] = ("(i) x0-grad", lambda s=s: {"x0grad": PredictedImageGradient("norm", scale=s)})
    return g


def combo_grid(tail_name: str, tail_factory: Factory) -> dict[str, tuple[str, Factory]]:
    """The best tail config combined with each x0 pull (f)(g)(h) at each eta."""
    g = {}
    for key, variant in PULLS.items():
        for eta in ETAS:
            g[f"{tail_name}+x0{key}_eta{eta}"] = (f"tail+x0 ({key})", lambda variant=variant, eta=eta: {
                **tail_factory(), "x0": PredictedImagePull(variant, scale=eta)})
    return g


# ------------------------------------------------------------------------------------------------ sampling


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % toy.NUM_CLASSES


def run_config(name: str, guidances: dict[str, Guidance], num_samples: int = 6000, steps: int = 100,
               seed: int = 0, *, denoiser: str = DENOISER, classifier: str = CLASSIFIER
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_samples`` points (labels i mod 3, seeds ``seed * 10**7 + i``: the same for every config)
    with DDPM at ``steps`` respaced steps under ``guidances``. Returns ``(x (n, 2) model units, labels)``."""
    labels = balanced_labels(num_samples)
    seeds = seed * 10**7 + torch.arange(num_samples)
    module = GuidedDiffusion(network=NetworkSpec(preset=denoiser), classifier=NetworkSpec(preset=classifier),
                             diffusion={"timestep_respacing": str(steps)}, sampler="ddpm", clip_denoised=False,
                             guidances=dict(guidances), progress=False)
    x = module.sample(labels, seeds)
    if not torch.isfinite(x).all():
        raise RuntimeError(f"{name}: non-finite samples")
    return x.float(), labels


# ------------------------------------------------------------------------------------------------ metrics


def bayes_log_posterior(x: torch.Tensor) -> torch.Tensor:
    """log p(c | x) of the true mixture (equal class priors), x in model units -> (n, 3)."""
    xw = torch.as_tensor(x, dtype=torch.float64) * toy.SCALE
    d2 = torch.cdist(xw, toy.CENTRES_WORLD) ** 2
    s2 = toy.SIGMAS_WORLD ** 2
    share = torch.tensor(toy.SHARES, dtype=torch.float64)[toy.MODE_KIND]
    log_comp = share.log() - d2 / (2 * s2) - torch.log(2 * math.pi * s2)  # (n, 9)
    log_cls = torch.stack([log_comp[:, toy.MODE_CLASS == c].logsumexp(1) for c in range(toy.NUM_CLASSES)], 1)
    return log_cls - log_cls.logsumexp(1, keepdim=True)


def real_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, labels, mode ids)`` of n real points with labels i mod 3 from a generator seeded ``seed``."""
    return toy.sample(n, balanced_labels(n), generator=torch.Generator().manual_seed(seed))


def evaluate(x: torch.Tensor, labels: torch.Tensor, ref: dict, clf: torch.nn.Module) -> dict[str, float]:
    """All per-config metrics of samples ``x`` against ``ref`` = {"x", "labels", "rare"} (see module docstring)."""
    x = x.double()
    m: dict[str, float] = dict(toy.mode_shares(x, labels))
    m["bayes_acc"] = (bayes_log_posterior(x).argmax(1) == labels).double().mean().item()
    with torch.no_grad():
        probs = torch.softmax(clf(x.float(), torch.zeros(len(x), dtype=torch.long)).double(), 1)
    m["clf_acc"] = (probs.argmax(1) == labels).double().mean().item()
    m["clf_conf"] = probs[torch.arange(len(x)), labels].mean().item()
    real = ref["x"].double()
    m.update({k.upper()[0]: float(v) for k, v in prdc(real, x, k_pr=3, k_dc=5).items()})
    masks = manifold_masks(real, x, k_pr=3, k_dc=5)  # the per-point indicators behind prdc
    rare = ref["rare"]
    m["R_rare"] = masks["real_in_fake"][rare].double().mean().item()
    m["C_rare"] = masks["real_covered"][rare].double().mean().item()
    m["FD"] = frechet_distance_features(real, x)
    m["cFD"] = float(np.mean([frechet_distance_features(real[ref["labels"] == c], x[labels == c])
                              for c in range(toy.NUM_CLASSES)]))
    return m


def select_best(results: dict[str, dict], candidates: list[str], base: str = "uncond") -> tuple[str | None, bool]:
    """Apply :data:`RULE` to ``candidates``; returns ``(name, feasible)`` (if nothing is feasible, the highest
    C rare overall is returned with ``feasible=False``)."""
    cands = [c for c in candidates if c in results]
    if not cands:
        return None, False
    b = results[base]["metrics"] if base in results else None

    def ok(name):
        m = results[name]["metrics"]
        return b is None or (m["P"] >= b["P"] - RULE["dP"] and m["off"] <= b["off"] + RULE["dOff"]
                             and m["bayes_acc"] >= b["bayes_acc"] - RULE["dAcc"])

    feasible = [c for c in cands if ok(c)]
    pool = feasible or cands
    top = max(results[c]["metrics"]["C_rare"] for c in pool)
    ties = [c for c in pool if results[c]["metrics"]["C_rare"] >= top - RULE["tie"]]
    return min(ties, key=lambda c: results[c]["metrics"]["cFD"]), bool(feasible)


# ------------------------------------------------------------------------------------------------ CLI


def _npz_key(name: str) -> str:
    return name.replace(" ", "_").replace("#", "n")


def _run_many(configs: dict[str, tuple[str, Factory]], args, ref, clf, results, samples) -> None:
    from tqdm import tqdm

    bar = tqdm(configs.items(), desc="configs", unit="cfg", file=sys.stderr)
    for name, (family, factory) in bar:
        bar.set_postfix_str(name)
        guidances = factory()
        t0 = time.perf_counter()
        x, labels = run_config(name, guidances, args.num_samples, args.steps, args.seed,
                               denoiser=args.denoiser, classifier=args.classifier)
        secs = time.perf_counter() - t0
        metrics = evaluate(x, labels, ref, clf)
        results[name] = {"family": family, "guidances": {k: repr(v) for k, v in guidances.items()},
                         "sample_seconds": round(secs, 2), "metrics": metrics}
        samples[name] = x.numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/toy_study")
    ap.add_argument("--num-samples", type=int, default=6000, help="samples per config (balanced over 3 classes)")
    ap.add_argument("--steps", type=int, default=100, help="DDPM respacing")
    ap.add_argument("--seed", type=int, default=0, help="noise bank (per-sample seeds seed*1e7 + i) and real sets")
    ap.add_argument("--configs", nargs="*", help="subset of config names (default: all)")
    ap.add_argument("--denoiser", default=DENOISER)
    ap.add_argument("--classifier", default=CLASSIFIER)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="redo results.md and plots from --out's files")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from toy_study_report import write_report

    if args.report_only:
        summary = json.loads((out / "results.json").read_text())
        with np.load(out / "samples.npz") as z:
            samples = {k: z[_npz_key(k)] for k in summary["configs"]}
            labels = torch.from_numpy(z["labels"])
        write_report(summary, samples, labels, out)
        return 0

    null_label = NetworkSpec(preset=args.denoiser).sampling.get("null_label")
    base = grid(null_label)
    unknown = set(args.configs or []) - set(base) - {"real"}
    wanted = [c for c in base if not args.configs or c in args.configs or c == "uncond"]
    n = args.num_samples
    rx, ry, rmode = real_set(n, REAL_SEED_OFFSET + args.seed)
    ref = {"x": rx, "labels": ry, "rare": toy.MODE_KIND[rmode] != 0}
    clf = NetworkSpec(preset=args.classifier).build()
    results: dict[str, dict] = {}
    samples: dict[str, np.ndarray] = {}
    t_start = time.time()
    x2, y2, _ = real_set(n, 2 * REAL_SEED_OFFSET + args.seed)
    results["real #2"] = {"family": "real (2nd draw)", "guidances": {}, "sample_seconds": 0.0,
                          "metrics": evaluate(x2, y2, ref, clf)}
    samples["real #2"] = x2.numpy()
    _run_many({c: base[c] for c in wanted}, args, ref, clf, results, samples)

    tails = [c for c in results if results[c]["family"] in TAIL_FAMILIES]
    best_tail, tail_ok = select_best(results, tails)
    best_combo, combo_ok = None, False
    if best_tail is not None:
        combos = combo_grid(best_tail, base[best_tail][1])
        combos = {c: v for c, v in combos.items() if not args.configs or c.split("+")[1] in args.configs}
        _run_many(combos, args, ref, clf, results, samples)
        best_combo, combo_ok = select_best(results, list(combos))

    summary = {
        "command": "python tools/toy_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {"num_samples": n, "steps": args.steps, "seed": args.seed, "denoiser": args.denoiser,
                     "classifier": args.classifier, "null_label": null_label, "sampler": "ddpm",
                     "clip_denoised": False, "real_ref_seed": REAL_SEED_OFFSET + args.seed,
                     "rare_reals": int(ref["rare"].sum())},
        "truth": {**toy.TRUE_SHARES, "expected": toy.expected_shares()},
        "rule": RULE,
        "best_tail": {"name": best_tail, "feasible": tail_ok},
        "best_tail_x0": {"name": best_combo, "feasible": combo_ok},
        "unknown_configs": sorted(unknown),
        "wall_seconds": round(time.time() - t_start, 1),
        "configs": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    np.savez_compressed(out / "samples.npz", labels=balanced_labels(n).numpy(), real=rx.numpy(),
                        **{_npz_key(k): v for k, v in samples.items()})
    write_report(summary, samples, balanced_labels(n), out)
    print(f"best tail: {best_tail} (feasible={tail_ok}); best tail+x0: {best_combo} (feasible={combo_ok})")
    print(f"wrote {out}/results.json, results.md and plots in {summary['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
