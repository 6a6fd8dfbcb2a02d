"""torch.compile vs eager, block by block, on the 64x64 ADM UNet under autocast (issue 11's compile x autocast bug).

    python tools/compile_check.py [--autocast bf16|none] [--threads 1] [--whole]

Random weights (the zero-initialised layers filled with N(0, 0.02), so that no output is trivially 0), batch 2,
t = (999, 500). Each top-level block (timestep/class embedding, every input block, the middle block, every output
block, the output head) is compiled alone (inductor) and run on the input the eager network gives it; the line
says whether the compiled output is finite and its max abs difference from eager. The middle block is also
split: each of its three layers alone, and pairs. ``--whole`` also compiles the whole UNet (20+ min on 2 cores).
What it showed on torch 2.14 (docs/bench/2026-12-01_s6_compile.md): under bf16 every block but the middle block
and the three 8x8 output blocks after it is finite, and each layer of the middle block alone is finite.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo

from tailgen.models.spec import NetworkSpec


def check(name: str, fn, dtype, *args) -> torch.Tensor:
    """Compile ``fn`` alone, run it and eager under ``dtype`` autocast, print one line; returns eager's output."""
    with torch.no_grad(), torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        eager = fn(*args)
        start = time.perf_counter()
        compiled = torch.compile(fn)(*args)
    diff = (compiled.float() - eager.float()).abs().max().item()
    print(f"{name}: compile {time.perf_counter() - start:.0f} s, compiled finite "
          f"{torch.isfinite(compiled.float()).all().item()}, eager finite {torch.isfinite(eager.float()).all().item()}, "
          f"max abs diff {diff:.4g} (eager max {eager.float().abs().max().item():.4g})", flush=True)
    return eager


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--autocast", choices=["bf16", "none"], default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--whole", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = torch._dynamo.config.cache_size_limit = 1000  # one graph per block
    dtype = torch.bfloat16 if args.autocast == "bf16" else None
    torch.manual_seed(0)
    net = NetworkSpec(preset="64x64_diffusion", flags={"use_fp16": False}, random_init=True).build()
    net = net.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    for _, param in sorted(net.named_parameters()):
        if not param.any():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    x, t, y = torch.randn(2, 3, 64, 64), torch.tensor([999, 500]), torch.arange(2)
    emb = check("embed", lambda x, t, y: net.embed(x, t, y, None), dtype, x, t, y)
    h, skips = x, []
    for i, block in enumerate(net.input_blocks):
        h = check(f"input_blocks[{i}] ({h.shape[-1]}px)", lambda h, e, b=block: b(h, e), dtype, h, emb)
        skips.append(h)
    res0, attention, res2 = net.middle_block
    with torch.no_grad(), torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        h0 = res0(h, emb)
        h1 = attention(h0)
    check("middle[0] ResBlock", lambda h: res0(h, emb), dtype, h)
    check("middle[1] AttentionBlock", attention, dtype, h0)
    check("middle[2] ResBlock", lambda h: res2(h, emb), dtype, h1)
    check("middle[0:2]", lambda h: attention(res0(h, emb)), dtype, h)
    check("middle[1:3]", lambda h: res2(attention(h), emb), dtype, h0)
    h = check("middle block", lambda h, e: net.middle_block(h, e), dtype, h, emb)
    for i, block in enumerate(net.output_blocks):
        h = check(f"output_blocks[{i}]", lambda h, e, b=block: b(h, e), dtype, torch.cat([h, skips.pop()], 1), emb)
    check("out", net.out, dtype, h)
    if args.whole:
        check("whole UNet", lambda x, t, y: net(x, t, y), dtype, x, t, y)


if __name__ == "__main__":
    main()
