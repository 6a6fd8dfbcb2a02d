"""tailgen vs guided-diffusion, per image, on the same weights: guided and unguided DDPM (issue 11).

    python tools/bench.py [--reference ../shared/reference/guided-diffusion] [--cases fashion,adm64]
                          [--batch-fashion 80 --batch-adm64 2] [--steps 50 --steps-adm64 10] [--repeats 5]
                          [--autocast bf16] [--channels-last] [--attention sdpa] [--compile]
                          [--quantize int8 [--calibration 256]]
                          [--json bench.json] [--quick]

Cases: ``fashion`` = the shipped fashion_diffusion + fashion_noisy_classifier; ``adm64`` = the official 64x64
UNet + classifier architecture with random weights (timing only). The reference networks are built by
guided-diffusion's own ``UNetModel`` / ``EncoderUNetModel`` (imported from ``--reference`` at run time) and get
tailgen's state dict, so both sides compute the same function; the reference samples with its
``p_sample_loop`` (+ the ``cond_fn`` of its ``classifier_sample.py``), always in float32 (its flags only offer
fp16 torsos on GPU). Per repeat the order is tailgen, reference, bare (A B C A B C ...), so machine noise hits all.

``bare`` = the same number of network calls in a plain loop (UNet; when guided also the classifier forward +
backward of log p(y | x)) under tailgen's speed options: ``tailgen / bare`` is the framework overhead.
The speed options apply to tailgen and bare only. ``--quantize int8`` (CPU) calibrates the int8 UNet when the
runs are set up, before any timed call. Prints a markdown table; ``--json`` writes all numbers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from tailgen.guidance import ClassifierGuidance
from tailgen.models import adm
from tailgen.models.spec import NetworkSpec
from tailgen.models.speed import hardware_report, time_first_call
from tailgen.module.guided import GuidedDiffusion
from tailgen.utils.io import atomic_write

CASES = {
    "fashion": dict(network=dict(preset="fashion_diffusion"), classifier=dict(preset="fashion_noisy_classifier")),
    "adm64": dict(network=dict(preset="64x64_diffusion", flags={"use_fp16": False}, random_init=True),
                  classifier=dict(preset="64x64_classifier", flags={"classifier_use_fp16": False}, random_init=True)),
}
DEFAULT_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared/reference/guided-diffusion"


def import_reference(path: Path):
    """guided-diffusion's unet and script_util modules from a checkout at ``path`` (one clear error if absent)."""
    if not (path / "guided_diffusion" / "unet.py").is_file():
        sys.exit(f"error: no guided-diffusion checkout at {path} (guided_diffusion/unet.py missing): "
                 "pass --reference PATH of a guided-diffusion checkout")
    sys.path.insert(0, str(path))
    from guided_diffusion import script_util, unet  # noqa: PLC0415 (run-time import from a user path)
    return unet, script_util


def reference_networks(ref_unet, net_spec: NetworkSpec, clf_spec: NetworkSpec, module: GuidedDiffusion):
    """The reference's own network classes, built through tailgen's flag mapping, loaded with tailgen's weights."""
    with mock.patch.object(adm, "UNetModel", ref_unet.UNetModel), \
         mock.patch.object(adm, "EncoderUNetModel", ref_unet.EncoderUNetModel):
        net = adm.create_model(**net_spec.flags_resolved)
        clf = adm.create_classifier(**clf_spec.flags_resolved)
    net.load_state_dict(module.net.state_dict())
    clf.load_state_dict(module.classifier_net.state_dict())
    # Parameters keep requires_grad as in the reference's classifier_sample.py: its AttentionBlock always runs
    # through its own gradient checkpoint, whose backward needs the parameters to require grad.
    return net.eval(), clf.eval()


def reference_diffusion(script_util, net_spec: NetworkSpec, steps: int):
    flags = {**net_spec.diffusion_flags, "steps": net_spec.diffusion_flags.get("diffusion_steps", 1000),
             "timestep_respacing": str(steps)}
    names = inspect.signature(script_util.create_gaussian_diffusion).parameters
    return script_util.create_gaussian_diffusion(**{k: v for k, v in flags.items() if k in names})


def reference_sampler(diffusion, net, clf, shape, labels, guided: bool):
    def cond_fn(x, t, y=None):  # classifier_sample.py's cond_fn, scale 1
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(clf(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0]

    def run():
        torch.manual_seed(0)
        diffusion.p_sample_loop(net, shape, model_kwargs={"y": labels}, cond_fn=cond_fn if guided else None,
                                device=labels.device, progress=False)
    return run


def bare_loop(module: GuidedDiffusion, shape, labels, steps: int, guided: bool):
    """The same network calls as one sampling run, with the same speed options, in a plain loop."""
    denoiser, classifier = module._denoiser(), module._noisy_classifier()
    x = torch.randn(shape, device=labels.device)

    def run():
        for i in range(steps - 1, -1, -1):
            with torch.no_grad():
                denoiser(x, i, labels)
            if guided:
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    log_p = torch.log_softmax(classifier(x_in, i).float(), -1)[torch.arange(len(labels), device=x.device),
                                                                              labels]
                    torch.autograd.grad(log_p.sum(), x_in)
    return run


def build_module(case: str, steps: int, guided: bool, args) -> GuidedDiffusion:
    spec = CASES[case]
    return GuidedDiffusion(
        network=NetworkSpec(**spec["network"]), classifier=NetworkSpec(kind="classifier", **spec["classifier"]),
        diffusion={"timestep_respacing": str(steps)}, sampler="ddpm",
        guidances={"classifier": ClassifierGuidance(scale=1.0)} if guided else None, progress=False,
        check_samples=False, autocast=args.autocast, autocast_classifier=args.autocast_classifier,
        channels_last=args.channels_last, attention=args.attention, compile=args.compile,
        quantize=args.quantize, calibration=args.calibration,
    ).to(args.device)


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bench_case(case: str, guided: bool, batch: int, steps: int, args, ref_unet, script_util, sync) -> dict:
    module = build_module(case, steps, guided, args)
    net_spec = NetworkSpec(**CASES[case]["network"])
    clf_spec = NetworkSpec(kind="classifier", **CASES[case]["classifier"])
    ref_net, ref_clf = reference_networks(ref_unet, net_spec, clf_spec, module)
    ref_net.to(args.device), ref_clf.to(args.device)
    num_classes = module.num_classes or 1
    labels = torch.arange(batch, device=args.device) % num_classes
    seeds = torch.arange(batch)
    shape = (batch, *module.image_shape)
    runs = {
        "tailgen": lambda: module.sample(labels, seeds),
        "reference": reference_sampler(reference_diffusion(script_util, net_spec, steps), ref_net, ref_clf,
                                       shape, labels, guided),
        "bare": bare_loop(module, shape, labels, steps, guided),
    }
    with torch.no_grad():  # same weights, same function: the two UNets agree on one input
        x, t = torch.randn(shape, device=args.device), torch.full((batch,), 500, device=args.device)
        same = (ref_net(x, t, y=labels) - module.net(x, t, y=labels)).abs().max().item()
    first = {name: time_first_call(run) for name, run in runs.items()}  # warm-up (tailgen: compiles if asked)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternate: tailgen, reference, bare, tailgen, ...
        for name, run in runs.items():
            times[name].append(timed(run, sync) / batch)
    med = {name: statistics.median(values) for name, values in times.items()}
    compile_s = first["tailgen"] - med["tailgen"] * batch if args.compile else None  # first call minus a plain one
    return {"case": case, "compile_s_estimate": compile_s, "guided": guided, "batch": batch, "steps": steps, "repeats": args.repeats,
            "unet_max_abs_diff_vs_reference": same, "first_call_s": first, "per_image_s": times, "median_per_image_s": med,
            "speedup_vs_reference": med["reference"] / med["tailgen"], "overhead_vs_bare": med["tailgen"] / med["bare"]}


def markdown(rows: list[dict], settings: str) -> str:
    lines = [f"settings: {settings}", "",
             "| case | guided | batch | steps | tailgen s/img | guided-diffusion s/img | speed-up | tailgen/bare | "
             "first call s (tailgen) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["median_per_image_s"]
        lines.append(f"| {r['case']} | {'yes' if r['guided'] else 'no'} | {r['batch']} | {r['steps']} | "
                     f"{m['tailgen']:.4f} | {m['reference']:.4f} | {r['speedup_vs_reference']:.2f}x | "
                     f"{r['overhead_vs_bare']:.3f} | {r['first_call_s']['tailgen']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="guided-diffusion checkout")
    ap.add_argument("--cases", default="fashion,adm64", help="comma list of: " + ", ".join(CASES))
    ap.add_argument("--guided", default="yes,no", help="comma list of yes / no")
    ap.add_argument("--batch-fashion", type=int, default=80)
    ap.add_argument("--batch-adm64", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50, help="DDPM steps (fashion)")
    ap.add_argument("--steps-adm64", type=int, default=10, help="DDPM steps (adm64)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autocast", choices=["auto", "bf16", "fp16"], default=None)
    ap.add_argument("--autocast-classifier", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--attention", choices=["auto", "matmul", "sdpa"], default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--quantize", choices=["int8"], default=None, help="int8 UNet (CPU; models/quantize.py)")
    ap.add_argument("--calibration", type=int, default=256, help="calibration inputs for --quantize")
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny batches, 2 steps, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_fashion, args.batch_adm64, args.steps, args.steps_adm64, args.repeats = 2, 1, 2, 2, 1
    bad = [c for c in args.cases.split(",") if c not in CASES]
    if bad:
        ap.error(f"unknown case {bad[0]!r}: use {', '.join(CASES)}")
    if args.repeats < 1 or args.steps < 1 or args.steps_adm64 < 1:
        ap.error("--repeats, --steps and --steps-adm64 must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref_unet, script_util = import_reference(args.reference.resolve())
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    rows = []
    for case in args.cases.split(","):
        batch = args.batch_fashion if case == "fashion" else args.batch_adm64
        steps = args.steps if case == "fashion" else args.steps_adm64
        for guided in (g.strip() == "yes" for g in args.guided.split(",")):
            print(f"[bench] {case} guided={guided} batch={batch} steps={steps} ...", file=sys.stderr, flush=True)
            rows.append(bench_case(case, guided, batch, steps, args, ref_unet, script_util, sync))
    settings = (f"device={args.device} threads={torch.get_num_threads()} autocast={args.autocast} "
                f"autocast_classifier={args.autocast_classifier} channels_last={args.channels_last} "
                f"attention={args.attention} compile={args.compile} quantize={args.quantize}"
                + (f" calibration={args.calibration}" if args.quantize else ""))
    result = {"settings": vars(args) | {"reference": str(args.reference), "json": str(args.json)},
              "hardware": hardware_report(), "rows": rows}
    print(markdown(rows, settings))
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))  # all or nothing
        print(f"numbers written to {args.json}")
    return result


if __name__ == "__main__":
    main()
