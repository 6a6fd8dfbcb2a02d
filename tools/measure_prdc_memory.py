"""Peak memory and time of tailgen.metrics.manifold.prdc on random features (default: ADM's setting,
50k samples vs 10k reference, 2048-d, CPU).

    python tools/measure_prdc_memory.py                       # 50k x 10k x 2048, block 4096
    python tools/measure_prdc_memory.py --n-fake 10000 --n-real 2000 --extrapolate 50000 10000

Prints the features' own size, process RSS before the call, peak RSS during it (sampled every 20 ms from
/proc/self/status, plus ru_maxrss), wall time, and (with --extrapolate) the time predicted for another size from
the cost model (N_fake^2 + N_real^2 + N_fake N_real) d, which dominates (three blocked distance passes).
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

import torch

from tailgen.metrics.manifold import prdc


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Background sampler of VmRSS (MB)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _cost(n_fake: int, n_real: int, dim: int) -> float:
    return (n_fake ** 2 + n_real ** 2 + n_fake * n_real) * dim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-fake", type=int, default=50_000)
    p.add_argument("--n-real", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--extrapolate", type=int, nargs=2, metavar=("N_FAKE", "N_REAL"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(args.n_real, args.dim, generator=g, dtype=dtype).to(args.device)
    fake = (0.1 + torch.randn(args.n_fake, args.dim, generator=g, dtype=dtype)).to(args.device)
    feat_mb = (real.numel() + fake.numel()) * real.element_size() / 2 ** 20
    before = _rss_mb()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        out = prdc(real, fake, block_size=args.block_size)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"sizes: fake {args.n_fake} x real {args.n_real} x dim {args.dim} ({args.dtype}, {args.device}, "
          f"block {args.block_size}, threads {torch.get_num_threads()})")
    print(f"features: {feat_mb:.0f} MB; RSS before: {before:.0f} MB; peak RSS during: {peak.peak:.0f} MB "
          f"(+{peak.peak - before:.0f} MB); ru_maxrss: {maxrss:.0f} MB")
    if args.device.startswith("cuda"):
        print(f"cuda peak allocated: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB")
    print(f"time: {wall:.1f} s; result: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    if args.extrapolate:
        nf, nr = args.extrapolate
        scale = _cost(nf, nr, args.dim) / _cost(args.n_fake, args.n_real, args.dim)
        print(f"extrapolated time for fake {nf} x real {nr}: {wall * scale:.0f} s (x{scale:.1f}, cost model "
              f"(Nf^2 + Nr^2 + Nf Nr) d; memory beyond the features stays ~ a few block^2 tiles)")


if __name__ == "__main__":
    main()
