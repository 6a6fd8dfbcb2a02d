"""Where a guided DDPM run spends its time beyond the UNet and the classifier forward/backward (issue 11).

    python tools/profile_guided.py [--batch 16] [--steps 5] [--rows 25] [--trace trace.json]

Runs the Fashion default networks (fashion_diffusion + fashion_noisy_classifier, ADM-G s=1) under
``torch.profiler`` and prints (1) the time inside the UNet, inside the classifier forward and inside autograd's
backward, and the rest (sampler arithmetic, guidance bookkeeping, noise, checks) as a share of the run;
(2) the top ops by self CPU time outside the networks; (3) the minor page faults of the profiled run (memory the
allocator had to get afresh from the kernel, e.g. for a classifier graph kept alive past its backward: 7-9
thousand per step at batch 80 before issue 11's fix, a few hundred after). Timings on a loaded machine are not benchmarks; the shares and
the fault count still point at what to remove.
"""

from __future__ import annotations

import argparse
import resource

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tailgen.guidance import ClassifierGuidance
from tailgen.models.spec import NetworkSpec
from tailgen.module.guided import GuidedDiffusion


def label_calls(net, name: str) -> None:
    """Run ``net``'s forward inside a profiler scope ``name`` so the profile can split the network off."""
    forward = net.forward

    def labelled(*args, **kwargs):
        with record_function(name):
            return forward(*args, **kwargs)
    net.forward = labelled


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = ap.parse_args(argv)
    labels, seeds = torch.arange(args.batch) % 10, torch.arange(args.batch)
    module = GuidedDiffusion(NetworkSpec(preset="fashion_diffusion"), NetworkSpec(preset="fashion_noisy_classifier"),
                             diffusion={"timestep_respacing": str(args.steps)}, progress=False,
                             guidances={"classifier": ClassifierGuidance(scale=1.0)})
    label_calls(module.net, "unet")
    label_calls(module.classifier_net, "classifier_forward")
    grad = torch.autograd.grad

    def labelled_grad(*a, **k):  # every autograd.grad of the run is the classifier backward
        with record_function("classifier_backward"):
            return grad(*a, **k)
    torch.autograd.grad = labelled_grad
    module.sample(labels, seeds)  # warm-up
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    module.sample(labels, seeds)  # counted without the profiler, whose own records take fresh memory
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("sample"):
            module.sample(labels, seeds)
    events = prof.key_averages()
    total = {e.key: e.cpu_time_total for e in events}
    whole = total["sample"]
    parts = {name: total.get(name, 0) for name in ("unet", "classifier_forward", "classifier_backward")}
    print(f"batch={args.batch} steps={args.steps} threads={torch.get_num_threads()} whole run {whole / 1e3:.1f} ms")
    for name, us in parts.items():
        print(f"  {name:<30} {us / 1e3:9.1f} ms  {100 * us / whole:5.1f} %")
    rest = whole - sum(parts.values())
    print(f"  {'rest (sampler + guidance)':<30} {rest / 1e3:9.1f} ms  {100 * rest / whole:5.1f} %")
    print(f"  minor page faults, a run without the profiler: {faults} ({faults / args.steps:.0f} per step)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
