"""Measure a classifier's accuracy on the Fashion-MNIST test split (or the toy mixture), clean and noisy.

    python tools/eval_classifier.py tailgen/weights/fashion_clean_classifier.pt [--threads 1] [--json out.json]
    python tools/eval_classifier.py runs/fashion_noisy_classifier/checkpoints/last.ckpt   # EMA/net of a checkpoint

For each t in --t (default 0 50 100 250 500 750) it reports the accuracy of argmax p(y | x_t, t) with
x_t ~ q(x_t | x0) (fixed noise, seed 0; t = 0 means clean images, as ADM's classifier sees at the last step),
plus "small t": t ~ U{0..99}, and the mean normalised entropy H(p) / log C at each (ECT keeps it from
collapsing). A clean classifier is always evaluated at t = 0 with x_t from its --t list too,
which shows how fast it degrades under noise (it is not meant to be used there).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from export_weights import load_exported
from tailgen.diffusion.process import DiffusionProcess
from tailgen.models.presets import build_network
from tailgen.module.train import ema_state_dict


def load_any(path: str) -> tuple[torch.nn.Module, dict]:
    """Exported ``.pt`` (+ ``.json``) or a trainer ``.ckpt`` -> (network fp32 eval, info with flags/diffusion)."""
    if path.endswith(".ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hp = ckpt["hyper_parameters"]
        net = build_network("classifier", dict(hp["network"]), arch=hp.get("arch", "adm"))
        sd, which = ema_state_dict(ckpt)
        net.load_state_dict(sd)
        info = {"arch": hp.get("arch", "adm"), "flags": hp["network"], "diffusion": hp.get("diffusion") or {},
                "trainer": {"noised": hp.get("noised", True)}, "source": {"weights": which, "step": ckpt["global_step"]}}
        return net.float().eval().requires_grad_(False), info
    return load_exported(path)


@torch.no_grad()
def evaluate(net, info: dict, ts: list[int], batch_size: int = 500, small_t: int = 100, limit: int | None = None):
    process = DiffusionProcess.from_flags(**info["diffusion"])
    if info["arch"] == "toy_mlp":
        from tailgen.data import toy

        x, y, _ = toy.sample(20000, labels=torch.arange(20000) % 3, generator=torch.Generator().manual_seed(123))
    else:
        from tailgen.data.fashion_mnist import FashionMNIST

        ds = FashionMNIST("test", image_size=int(info["flags"].get("image_size", 28)))
        x, y = ds.images, ds.labels
    if limit:
        x, y = x[:limit], y[:limit]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    t_small = torch.randint(0, small_t, (x.shape[0],), generator=g)
    results, entropy = {}, {}
    for name, tt in [*[(f"t={t}", torch.full((x.shape[0],), t)) for t in ts], (f"t~U[0,{small_t})", t_small)]:
        correct, h = 0, 0.0
        for s in range(0, x.shape[0], batch_size):
            xb, tb = x[s:s + batch_size], tt[s:s + batch_size]
            xt = torch.where((tb > 0).view(-1, *[1] * (xb.dim() - 1)), process.q_sample(xb, tb, noise[s:s + batch_size]), xb)
            logits = net(xt, tb).float()
            correct += (logits.argmax(1) == y[s:s + batch_size]).sum().item()
            logp = logits.log_softmax(1)  # normalised entropy H(p) / log C: what ECT keeps from collapsing
            h += (-(logp.exp() * logp).sum(1) / math.log(logits.shape[1])).sum().item()
        results[name], entropy[name] = correct / x.shape[0], h / x.shape[0]
    return results, entropy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--t", type=int, nargs="*", default=[0, 50, 100, 250, 500, 750])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N test images only")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    net, info = load_any(a.weights)
    res, entropy = evaluate(net, info, a.t, limit=a.limit)
    for k, v in res.items():
        print(f"{k:>12}: accuracy {100 * v:.2f} %, mean H(p) / log C {entropy[k]:.3f}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"weights": a.weights, "accuracy": res, "normalised_entropy": entropy},
                                           indent=2) + "\n")


if __name__ == "__main__":
    main()
