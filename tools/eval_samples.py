"""Sample a tailgen diffusion model unguided and judge the samples with the clean classifier.

    python tools/eval_samples.py tailgen/weights/fashion_diffusion.pt --num 5000 --steps 50 --out runs/eval_fashion
    python tools/eval_samples.py runs/fashion_diffusion/checkpoints/last.ckpt --num 500      # EMA weights of a run
    python tools/eval_samples.py tailgen/weights/toy_denoiser.pt --num 20000 --steps 100      # toy: mode shares

Fashion: labels i mod 10, DDPM with ``--steps`` respaced steps (IDDPM learned variance, x0 clipped), per-sample
seeds ``seed + i``. Reports the clean classifier's accuracy on the samples (overall and per class), mean
confidence, and FID in the clean classifier's penultimate ("domain") features against the 10k test images;
writes ``samples.npz`` (arr_0 uint8 NHWC, arr_1 labels), ``grid.png`` and ``metrics.json`` under --out.
``--label null`` samples the unconditional model (the label-dropout null label) and reports the class histogram.
Toy: labels i mod 3, 100 DDPM steps with fixed small variance and no clipping, rare-mode shares vs the truth and
a scatter plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from eval_classifier import load_any as load_classifier
from export_weights import load_exported
from tailgen.diffusion.adapters import ADMDenoiser
from tailgen.diffusion.noise import SeededNoise
from tailgen.diffusion.process import DiffusionProcess
from tailgen.models.presets import build_network
from tailgen.module.train import ema_state_dict
from tailgen.sampling import SamplingRun, sample


def load_model(path: str) -> tuple[torch.nn.Module, dict]:
    if path.endswith(".ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hp = ckpt["hyper_parameters"]
        net = build_network("model", dict(hp["network"]), arch=hp.get("arch", "adm"))
        net.load_state_dict(ema_state_dict(ckpt)[0])
        info = {"arch": hp.get("arch", "adm"), "flags": dict(hp["network"]), "diffusion": dict(hp["diffusion"] or {}),
                "num_classes": hp["num_classes"], "null_label": hp["num_classes"],
                "source": {"checkpoint": path, "global_step": int(ckpt["global_step"])}}
        return net.float().eval().requires_grad_(False), info
    return load_exported(path)


class _Autocast(torch.nn.Module):
    """Run a network channels-last under CPU bfloat16 autocast and return float32 (sampling-speed option)."""

    def __init__(self, net):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
            return self.net(x, *args, **kwargs).float().contiguous()


def generate(net, info, num, steps, batch, seed=0, label="cond", bf16=False, clip=True, log=print):
    process = DiffusionProcess.from_flags(**{**info["diffusion"], "timestep_respacing": str(steps)})
    nc = int(info["num_classes"])
    denoiser = ADMDenoiser(_Autocast(net) if bf16 else net, process)
    shape = (1, int(info["flags"]["image_size"]), int(info["flags"]["image_size"])) if info["arch"] == "adm" \
        else (int(info["flags"].get("in_dim", 2)),)
    xs, ys = [], []
    t0 = time.perf_counter()
    for s in range(0, num, batch):
        idx = torch.arange(s, min(s + batch, num))
        y = idx % nc
        y_in = torch.full_like(y, int(info["null_label"])) if label == "null" else y
        noise = SeededNoise((seed + idx).tolist())
        x = noise.initial((len(idx), *shape))
        xs.append(sample("ddpm", SamplingRun(denoiser, noise=noise, clip_denoised=clip), x, process, y_in))
        ys.append(y)
        log(f"  {s + len(idx)}/{num} samples ({time.perf_counter() - t0:.0f} s)")
    return torch.cat(xs), torch.cat(ys)


def fashion_metrics(x, y, classifier_path, label, nc=10):
    from tailgen.data.fashion_mnist import load_fashion_mnist, CLASS_NAMES
    from tailgen.metrics.features import ClassifierFeatures
    from tailgen.metrics.fid import frechet_distance_features

    clf, _ = load_classifier(classifier_path)
    feats = ClassifierFeatures(clf, timestep=0, batch_size=500, name="fashion_clean_classifier")
    imgs = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    fake = feats(imgs)
    real_u8, _ = load_fashion_mnist("test")
    real = feats(torch.from_numpy(real_u8)[:, None])
    pred = fake["logits"].argmax(1)
    conf = fake["logits"].softmax(1).max(1).values
    out = {"num_samples": int(x.shape[0]), "fid_domain_vs_test": frechet_distance_features(fake["pool"], real["pool"]),
           "predicted_class_histogram": torch.bincount(pred, minlength=nc).tolist(),
           "mean_confidence": conf.mean().item()}
    if label != "null":
        out["class_accuracy"] = (pred == y).float().mean().item()
        out["per_class_accuracy"] = {CLASS_NAMES[c]: (pred[y == c] == c).float().mean().item() for c in range(nc)}
    # noise floor: the first 10k training images vs the test split in the same features (real vs real)
    train_u8, _ = load_fashion_mnist("train")
    out["fid_domain_train10k_vs_test"] = frechet_distance_features(
        feats(torch.from_numpy(train_u8[:10000])[:, None])["pool"], real["pool"])
    return out, imgs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--classifier", default="tailgen/weights/fashion_clean_classifier.pt")
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", choices=["cond", "null"], default="cond")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the diffusion network")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    net, info = load_model(a.weights)
    toy = info["arch"] == "toy_mlp"
    t0 = time.perf_counter()
    x, y = generate(net, info, a.num, a.steps, a.batch, a.seed, a.label, a.bf16, clip=not toy)
    gen_s = time.perf_counter() - t0
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if toy:
        from tailgen.data import toy as toydata

        metrics = {"num_samples": a.num, "shares": toydata.mode_shares(x, y), "expected": toydata.expected_shares()}
        if out:
            toydata.scatter_png(out / "scatter.png", x, y, title=f"{Path(a.weights).name} unguided")
            np.savez(out / "samples.npz", arr_0=x.numpy(), arr_1=y.numpy())
    else:
        metrics, imgs = fashion_metrics(x, y, a.classifier, a.label, int(info["num_classes"]))
        if out:
            np.savez(out / "samples.npz", arr_0=imgs.permute(0, 2, 3, 1).numpy(), arr_1=y.numpy())
            _grid(out / "grid.png", imgs[:100])
    metrics.update(weights=a.weights, steps=a.steps, sampler="ddpm", label=a.label, seed=a.seed,
                   generation_seconds=round(gen_s, 1), threads=a.threads, bf16=a.bf16)
    print(json.dumps(metrics, indent=2))
    if out:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _grid(path, imgs_u8, nrow=10):
    from PIL import Image

    n, c, h, w = imgs_u8.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.zeros((rows * h, nrow * w), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = imgs_u8[k, 0].numpy()
    Image.fromarray(canvas).resize((nrow * w * 2, rows * h * 2), Image.NEAREST).save(path)


if __name__ == "__main__":
    main()
