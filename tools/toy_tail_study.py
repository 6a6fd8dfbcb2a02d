"""Toy tail study v2: the Fashion-MNIST study's plug-ins (configs/study/fashion_tail.yaml) on the 2-D toy, where
the truth is known, against the ADM-G scale curve (docs/tail_study/PROTOCOL.md's rule; docs/toy_tail_study.md).

    python tools/toy_tail_study.py run    [--out docs/toy_tail_study] [--num-samples 3000] [--seeds 0 1 2]
                                          [--steps 100] [--only RUN ...] [--values METHOD=v1,v2,... | fashion]
    python tools/toy_tail_study.py list   [--values ...]        # the expanded runs
    python tools/toy_tail_study.py report [--out docs/toy_tail_study]   # tools/toy_tail_study_report.py

A run is ``<method>@<value>`` or ``<method>@<value>+adm_g@1`` (the plug-in on top of ADM-G s=1), named as in
the Fashion study; ``adm_g@0`` is the unguided model. A *unit* is (run, seed set k): ``num_samples`` points,
labels i mod 3, per-sample seeds k * 10**7 + i, DDPM ``steps`` respaced steps, x0_hat not clipped
(``toy_study.run_config``), scored by ``toy_study.evaluate`` against a held-out real set of the same size drawn
with seed 1000 + k. Every finished unit is written at once (atomically) into ``<out>/results.json``; a unit already
there is skipped, so a killed run resumes. The settings are stored too: a file made with other settings is refused.

Toy adaptations (everything else is the Fashion plan's): CFG's null label is the toy denoiser's (3); the
calibrated target is tabulated on toy data (``calibration_data: toy``, no disk cache); Sehwag hardness uses the
noisy toy classifier at t = 0 as its clean feature network (the toy has no separate clean classifier; the toy's
earlier study used the same network at t = 0 as its clean classifier) with class Gaussians fitted on
``HARDNESS_FIT_POINTS`` real toy points (``SehwagHardnessGuidance.bind``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_study import (
    CLASSIFIER,
    DENOISER,
    REAL_SEED_OFFSET,
    evaluate,
    real_set,
    run_config,
)

from tailgen.data import toy
from tailgen.guidance import (
    CADS,
    CalibratedTargetGuidance,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    Guidance,
    LangevinPull,
    LowDensityGuidance,
    SehwagHardnessGuidance,
    SelfGuidedMinorityGuidance,
)
from tailgen.guidance.hardness import ClassGaussians, penultimate_features
from tailgen.models.spec import NetworkSpec
from tailgen.utils.io import atomic_write

CURVE = "adm_g"
CURVE_SCALES = (0, 0.25, 0.5, 1, 2, 4)
WITH_ADM_G = 1.0
INTERVAL = (0.236, 0.733)  # Kynkaanniemi et al. 2024, as the Fashion plan
HARDNESS_FIT_POINTS, HARDNESS_FIT_SEED = 30000, 3000
FORMAT = "toy-tail-study-v1"
HARDNESS_NOTE = (f" bound to toy_classifier features at t=0, class Gaussians fitted on {HARDNESS_FIT_POINTS} real toy "
                 f"points (seed {HARDNESS_FIT_SEED}); its data/cache_dir arguments are unused")


class Context:
    """What factories need beyond the value: the denoiser's null label and, built once, hardness's pieces."""

    def __init__(self, denoiser: str = DENOISER, classifier: str = CLASSIFIER):
        self.denoiser, self.classifier = denoiser, classifier
        self.null_label = NetworkSpec(preset=denoiser).sampling.get("null_label")
        self._hardness = None

    def hardness_parts(self) -> tuple[torch.nn.Module, ClassGaussians]:
        """The toy classifier (features at t = 0) and class Gaussians of its features on real toy points."""
        if self._hardness is None:
            net = NetworkSpec(preset=self.classifier).build().eval().requires_grad_(False)
            x, y, _ = toy.sample(HARDNESS_FIT_POINTS, generator=torch.Generator().manual_seed(HARDNESS_FIT_SEED))
            with torch.no_grad():
                feats = penultimate_features(net, x, 0)
            fitted = ClassGaussians.fit(feats, y, toy.NUM_CLASSES, shrinkage=1e-2)
            self._hardness = (net, GroupedGaussians(fitted.means, fitted.covs))
        return self._hardness


class GroupedGaussians(ClassGaussians):
    """``ClassGaussians`` with the same ``nll``, computed class by class: one triangular solve per class for all of
    its samples, instead of gathering a (B, k, k) Cholesky factor per sample (k = 128 on the toy: a 1500-sample
    hardness row took 30 s that way against 12 s grouped, with the same numbers)."""

    def nll(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype, device = features.dtype, features.device
        chol, means = self.chol.to(device, dtype), self.means.to(device, dtype)
        maha = features.new_zeros(features.shape[0])
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero()[:, 0]
            white = torch.linalg.solve_triangular(chol[c], (features[idx] - means[c]).T, upper=False)
            maha = maha.index_put((idx,), white.pow(2).sum(0))
        return 0.5 * (maha + self.logdet.to(device, dtype)[labels] + self.dim * math.log(2 * math.pi))


Make = Callable[[float, Context], dict[str, Guidance]]


def _hardness(v: float, ctx: Context) -> dict[str, Guidance]:
    net, gaussians = ctx.hardness_parts()
    g = SehwagHardnessGuidance(feature_network=NetworkSpec(preset=ctx.classifier), normalize=True, scale=v)
    return {"hardness": g.bind(net, gaussians)}


# method -> (make(value, ctx), the Fashion plan's values, the toy's values, also on top of ADM-G s=1).
# The toy's values: the Fashion plan's (or 3 of them), except where a pilot (seed set 0, 1500 samples, every
# Fashion value alone; docs/toy_tail_study.md) showed that the toy needs other magnitudes.
METHODS: dict[str, tuple[Make, tuple[float, ...], tuple[float, ...], bool]] = {
    "adm_g": (lambda v, c: {"cg": ClassifierGuidance(scale=v)} if v else {}, CURVE_SCALES, CURVE_SCALES, False),
    "cfg": (lambda v, c: {"cfg": ClassifierFreeGuidance(scale=v, null_label=c.null_label)},
            (0.1, 0.3, 1, 3), (0.1, 0.3, 1, 3), False),
    "interval": (lambda v, c: {"cg": ClassifierGuidance(scale=v, t_min=INTERVAL[0], t_max=INTERVAL[1])},
                 (1, 2, 4, 8), (1, 2, 4, 8), False),
    "tail_target": (lambda v, c: {"tail": LowDensityGuidance("target", scale=v, target_confidence=0.5, form="mean")},
                    (1, 2, 4, 8), (1, 2, 4), True),
    "tail_entropy": (lambda v, c: {"tail": LowDensityGuidance("entropy", scale=1.0, lam=v, form="mean")},
                     (0.5, 1, 2, 4), (1, 2, 4), True),
    "calibrated_target": (lambda v, c: {"tail": CalibratedTargetGuidance(
        scale=v, form="mean", target_quantile=0.2, per_class=True, calibration_data="toy", cache_dir=None)},
        (2, 4, 8, 16), (2, 4, 8), True),
    "langevin_pull": (lambda v, c: {"x0": LangevinPull(scale=v)}, (0.02, 0.05, 0.1, 0.25), (0.02, 0.1, 0.25), True),
    "cads": (lambda v, c: {"cads": CADS(scale=v)}, (0.1, 0.25, 0.5, 1.0), (0.25, 1, 4), True),
    "sg_minority": (lambda v, c: {"minority": SelfGuidedMinorityGuidance(scale=v, every=2)},
                    (0.05, 0.1, 0.2, 0.3), (0.1, 0.2, 0.3), True),
    "hardness": (_hardness, (0.1, 0.2, 0.3, 0.5), (0.05, 0.1, 0.2), True),
}


def _fmt(v: float) -> str:
    return f"{v:g}"


def expand(values: dict[str, tuple[float, ...]] | str | None = None) -> dict[str, dict]:
    """Runs ``{name: {"method", "value", "adm_g"}}``: the curve first, then every method's toy values alone and
    (for methods marked so) on top of ADM-G s=1. ``values`` overrides a method's values (``"fashion"``: the
    Fashion plan's values of every method)."""
    values = {m: spec[1] for m, spec in METHODS.items()} if values == "fashion" else (values or {})
    unknown = sorted(set(values) - set(METHODS))
    if unknown:
        raise SystemExit(f"toy_tail_study: unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    runs: dict[str, dict] = {}
    for method, (_, _fashion, default, combo) in METHODS.items():
        for v in values.get(method, default):
            runs[f"{method}@{_fmt(v)}"] = {"method": method, "value": float(v), "adm_g": None}
        if combo:
            for v in values.get(method, default):
                runs[f"{method}@{_fmt(v)}+{CURVE}@{_fmt(WITH_ADM_G)}"] = {
                    "method": method, "value": float(v), "adm_g": WITH_ADM_G}
    return runs


def guidances(run: dict, ctx: Context) -> dict[str, Guidance]:
    """Fresh guidance objects of ``run`` (the plug-in, plus ADM-G s=1 under the name ``cg`` for combinations)."""
    g = METHODS[run["method"]][0](run["value"], ctx)
    if run["adm_g"] is not None:
        g = {"cg": ClassifierGuidance(scale=run["adm_g"]), **g}
    return g


def parse_values(items: list[str] | None) -> dict[str, tuple[float, ...]] | str:
    if items == ["fashion"]:
        return "fashion"
    out = {}
    for item in items or []:
        method, sep, vals = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[method] = tuple(float(v) for v in vals.split(","))
        except ValueError:
            raise SystemExit(f"toy_tail_study: --values takes METHOD=v1,v2,... (got {item!r})") from None
    return out


# ------------------------------------------------------------------------------------------------ results file


def load_results(path: Path, settings: dict) -> dict:
    """The results file at ``path`` (or a fresh one); refuses a file written with other settings."""
    if not path.is_file():
        return {"format": FORMAT, "settings": settings, "runs": {}, "units": {}}
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT or data.get("settings") != settings:
        raise SystemExit(f"toy_tail_study: {path} holds results with other settings ({data.get('settings')}); "
                         f"use another --out or the same settings ({settings})")
    return data


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def dumps(data: dict) -> str:
    """The results file's text: one line per run and per unit (small, diff-friendly)."""
    head = {k: v for k, v in data.items() if k not in ("runs", "units")}
    lines = [json.dumps(head, indent=1)[:-2] + ","]
    for key in ("runs", "units"):
        body = data.get(key, {})
        items = [f"  {json.dumps(n)}: {json.dumps(_rounded(v))}" for n, v in body.items()] if key == "runs" else [
            f"  {json.dumps(n)}: {{" + ", ".join(f"{json.dumps(s)}: {json.dumps(_rounded(u))}" for s, u in v.items())
            + "}" for n, v in body.items()]
        lines.append(f' "{key}": {{' + ("\n" + ",\n".join(items) + "\n }" if items else "}")
                     + ("," if key == "runs" else ""))
    return "\n".join(lines) + "\n}\n"


def save_results(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(dumps(data)))


def run_unit(name: str, run: dict, seed: int, settings: dict, ctx: Context, refs: dict, clf) -> tuple[dict, dict]:
    """Sample and score one (run, seed set); returns (the run's description, the unit's record)."""
    if seed not in refs:
        rx, ry, rmode = real_set(settings["num_samples"], REAL_SEED_OFFSET + seed)
        refs[seed] = {"x": rx, "labels": ry, "rare": toy.MODE_KIND[rmode] != 0}
    g = guidances(run, ctx)
    t0 = time.perf_counter()
    x, labels = run_config(name, g, settings["num_samples"], settings["steps"], seed,
                           denoiser=settings["denoiser"], classifier=settings["classifier"])
    secs = time.perf_counter() - t0
    reprs = {k: repr(v) + (HARDNESS_NOTE if isinstance(v, SehwagHardnessGuidance) else "") for k, v in g.items()}
    return {**run, "guidances": reprs}, {"sample_seconds": round(secs, 2),
                                         "metrics": evaluate(x, labels, refs[seed], clf)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("run", "list", "report"))
    ap.add_argument("--out", default="docs/toy_tail_study")
    ap.add_argument("--num-samples", type=int, default=3000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--only", nargs="*", help="subset of run names (default: all)")
    ap.add_argument("--values", nargs="*", help="METHOD=v1,v2,... overrides a method's values; `fashion`: the "
                    "Fashion plan's values for every method (the pilot)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = Path(args.out)
    runs = expand(parse_values(args.values))
    if args.command == "list":
        print("\n".join(runs))
        return 0
    if args.command == "report":
        from toy_tail_study_report import write_report

        if not (out / "results.json").is_file():
            raise SystemExit(f"toy_tail_study report: no {out / 'results.json'}; run the study first")
        write_report(json.loads((out / "results.json").read_text()), out)
        return 0
    unknown = sorted(set(args.only or []) - set(runs))
    if unknown:
        raise SystemExit(f"toy_tail_study: unknown run(s) {unknown}; see `python tools/toy_tail_study.py list`")
    torch.set_num_threads(args.threads)
    settings = {"num_samples": args.num_samples, "steps": args.steps, "denoiser": DENOISER, "classifier": CLASSIFIER,
                "sampler": "ddpm", "clip_denoised": False, "real_ref_seed": f"{REAL_SEED_OFFSET} + seed set"}
    path = out / "results.json"
    data = load_results(path, settings)
    ctx, refs = Context(), {}
    clf = NetworkSpec(preset=CLASSIFIER).build()
    todo = [(n, s) for n in runs if not args.only or n in args.only for s in args.seeds
            if str(s) not in data["units"].get(n, {})]
    print(f"{len(todo)} unit(s) to run, {sum(map(len, data['units'].values()))} already in {path}", flush=True)
    for k, (name, seed) in enumerate(todo, 1):
        data["runs"][name], record = run_unit(name, runs[name], seed, settings, ctx, refs, clf)
        data["units"].setdefault(name, {})[str(seed)] = record
        save_results(path, data)
        m = record["metrics"]
        print(f"[{k}/{len(todo)}] {name} s{seed}: {record['sample_seconds']:.1f} s  rareA {100 * m['rareA']:.2f} "
              f"rareB {100 * m['rareB']:.2f} off {100 * m['off']:.2f} C_rare {m['C_rare']:.3f} cFD {m['cFD']:.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
