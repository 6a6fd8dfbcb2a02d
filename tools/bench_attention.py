"""Attention kernels side by side: the explicit matmul form vs SDPA, per shape, dtype and direction (issue 11).

    python tools/bench_attention.py [--threads 2] [--repeats 7] [--out docs/bench/attention.json]

For each shape of the 64x64 ADM UNet / classifier (batch 2) and of the Fashion networks (batch 80) it times
``qkv_attention`` with ``use_sdpa=False`` and ``True`` alternately (ABBA, three calls per timing) in one process,
forward only and forward + input gradient, in float32 and bf16, and prints the ratio of the medians
(matmul / sdpa: > 1 means SDPA is faster). The ``auto`` choice of ``models/attention.py`` (SDPA on CPU from
``CPU_SDPA_MIN_TOKENS`` tokens) comes from this table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tailgen.models.attention import CPU_SDPA_MIN_TOKENS, qkv_attention
from tailgen.models.speed import hardware_report
from tailgen.utils.io import atomic_write

# (batch, channels, heads, tokens): 64x64 UNet at 32x32 / 16x16 / 8x8, then Fashion-sized maps
SHAPES = [(2, 384, 6, 1024), (2, 576, 9, 256), (2, 768, 12, 64), (80, 64, 1, 196), (80, 128, 4, 196),
          (80, 128, 2, 49), (80, 256, 4, 49)]


def time_pair(batch: int, channels: int, heads: int, tokens: int, dtype: torch.dtype, grad: bool, repeats: int):
    """Median seconds of three calls for matmul and for SDPA, alternating which goes first."""
    qkv = torch.randn(batch, 3 * channels, tokens, dtype=dtype, requires_grad=grad)
    times = {False: [], True: []}
    for repeat in range(repeats):
        for use_sdpa in ((True, False) if repeat % 2 else (False, True)):
            start = time.perf_counter()
            for _ in range(3):
                out = qkv_attention(qkv, heads, True, use_sdpa=use_sdpa)
                if grad:
                    torch.autograd.grad(out.float().sum(), qkv)
            times[use_sdpa].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="JSON of every row (written atomically)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"threads {args.threads}; auto takes SDPA on CPU from {CPU_SDPA_MIN_TOKENS} tokens")
    print("| dtype | pass | batch, channels, heads, tokens | matmul s | sdpa s | matmul / sdpa |\n|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for grad in (False, True):
            for shape in SHAPES:
                matmul, sdpa = time_pair(*shape, dtype, grad, args.repeats)
                rows.append({"dtype": str(dtype).removeprefix("torch."), "pass": "fwd+grad" if grad else "fwd",
                             "shape": shape, "matmul_s": matmul, "sdpa_s": sdpa, "ratio": matmul / sdpa})
                r = rows[-1]
                print(f"| {r['dtype']} | {r['pass']} | {shape} | {matmul:.4f} | {sdpa:.4f} | {r['ratio']:.2f} |")
    if args.out:
        text = json.dumps({"hardware": hardware_report(), "threads": args.threads, "repeats": args.repeats,
                           "rows": rows}, indent=1)
        atomic_write(args.out, lambda tmp: tmp.write_text(text))
    return rows


if __name__ == "__main__":
    main()
