"""Framework overhead of tailgen's sampler over bare network calls, measured in one run.

    python tools/bench_overhead.py [--preset fashion_diffusion --classifier fashion_noisy_classifier]
                                   [--batch 64] [--steps 20] [--repeats 3] [--device cpu|cuda] [--threads 2]

Compares, for the same number of steps and the same batch:
  bare      : the UNet called in a Python loop with a precomputed x (no schedule maths, no noise)
  unguided  : tailgen's DDPM sampler (adapter, process coefficients, noise, NaN check)
  bare+clf  : UNet + classifier forward/backward of log p(y|x) per step
  guided    : tailgen's DDPM sampler with ClassifierGuidance (shared ClassifierEval)
and prints the ratios unguided/bare and guided/(bare+clf). Without a preset the tiny fixture networks are used.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tailgen.diffusion.adapters import ADMDenoiser, NoisyClassifier
from tailgen.diffusion.noise import SeededNoise
from tailgen.diffusion.process import DiffusionProcess
from tailgen.guidance import ClassifierGuidance
from tailgen.models.spec import NetworkSpec
from tailgen.sampling import sample_ddpm

FIXTURES = Path(__file__).resolve().parents[1] / "tests/fixtures/adm"
TINY_UNET = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,1,1", attention_resolutions="16,8",
                 num_head_channels=16, learn_sigma=True, class_cond=True, use_scale_shift_norm=True,
                 resblock_updown=True, use_new_attention_order=True, diffusion_steps=1000, noise_schedule="cosine")
TINY_CLF = dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16,8",
                classifier_channel_mult="1,2,2")


def specs(args):
    if args.preset:
        return NetworkSpec(preset=args.preset), NetworkSpec(preset=args.classifier)
    return (NetworkSpec(flags=TINY_UNET, checkpoint=str(FIXTURES / "tiny_unet32.pt")),
            NetworkSpec(kind="classifier", flags=TINY_CLF, checkpoint=str(FIXTURES / "tiny_classifier32.pt")))


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset")
    ap.add_argument("--classifier", default="fashion_noisy_classifier")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    net_spec, clf_spec = specs(args)
    net, clf = net_spec.build(device), clf_spec.build(device)
    flags = net_spec.flags_resolved
    process = DiffusionProcess.from_flags(**{**net_spec.diffusion_flags, "timestep_respacing": str(args.steps)})
    shape = (args.batch, flags.get("in_channels", 3), flags["image_size"], flags["image_size"])
    num_classes = net_spec.sampling.get("num_classes") or flags.get("num_classes", 1000)
    labels = torch.arange(args.batch, device=device) % num_classes
    seeds = list(range(args.batch))
    x = torch.randn(shape, device=device)
    t = torch.full((args.batch,), 500, device=device)

    @torch.no_grad()
    def bare():
        for _ in range(args.steps):
            net(x, t, labels)

    def bare_clf():
        for _ in range(args.steps):
            with torch.no_grad():
                net(x, t, labels)
            x_in = x.detach().requires_grad_(True)
            log_p = torch.log_softmax(clf(x_in, t), -1)[torch.arange(args.batch, device=device), labels]
            torch.autograd.grad(log_p.sum(), x_in)

    def run(guided: bool):
        noise = SeededNoise(seeds, device=device)
        sample_ddpm(ADMDenoiser(net, process), noise.initial(shape), process, labels, noise=noise,
                    guidance=[ClassifierGuidance(1.0)] if guided else None,
                    classifier=NoisyClassifier(clf, process) if guided else None)

    times = {"bare": timed(bare, args.repeats, sync), "unguided": timed(lambda: run(False), args.repeats, sync),
             "bare+clf": timed(bare_clf, args.repeats, sync), "guided": timed(lambda: run(True), args.repeats, sync)}
    print(f"device={device} batch={args.batch} steps={args.steps} threads={args.threads} "
          f"network={args.preset or 'tiny_unet32'}")
    for name, sec in times.items():
        print(f"  {name:<9} {sec:8.3f} s  ({sec / args.steps * 1e3:7.1f} ms/step)")
    print(f"overhead unguided/bare   = {times['unguided'] / times['bare']:.3f}")
    print(f"overhead guided/bare+clf = {times['guided'] / times['bare+clf']:.3f}")


if __name__ == "__main__":
    main()
