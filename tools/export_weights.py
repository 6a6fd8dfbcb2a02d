"""Export a trainer checkpoint's EMA weights as a plain float16 state dict under ``tailgen/weights/``.

    python tools/export_weights.py runs/fashion_clean_classifier/checkpoints/last.ckpt --name fashion_clean_classifier \
        [--meta '{"test_accuracy": 0.91}'] [--out tailgen/weights] [--fp32]

Writes ``<out>/<name>.pt`` (tensors only; loads with ``torch.load(weights_only=True)``; floating tensors in
float16 unless --fp32, which ``tailgen.models.checkpoint.load_into`` upcasts) and ``<out>/<name>.json``:
``{"name", "kind": "model" | "upsampler" | "classifier", "arch": "adm" | "toy_mlp", "flags": builder flags,
"diffusion": flags, "num_classes", "null_label", "trainer": hyper-parameters, "source": {checkpoint, global_step,
epoch, weights}, "dtype", "num_params", "meta": {...}}`` (``upsampler``: a ``SuperResTrainer`` checkpoint). The
exported file is checked by rebuilding the network from the JSON flags and loading it strictly.

A checkpoint of ``tailgen.module.distill.ExpertDistillation`` (PPAP experts) exports each expert with its LoRA
update merged (``merge_lora``: a plain network of the teacher's architecture, the teacher's file size) as
``<out>/<name>_expert<k>.pt`` + ``.json`` (``meta.expert``: index, t_range, fixed_t 0), and ``<out>/<name>.yaml``:
the expert list as a config fragment, e.g.
``tailgen predict --config configs/fashion/adm_g.yaml --config <out>/<name>.yaml``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tailgen.models.presets import build_network
from tailgen.module.train import ema_state_dict
from tailgen.utils.io import atomic_write

_KINDS = {"DiffusionTrainer": "model", "SuperResTrainer": "upsampler", "ClassifierTrainer": "classifier"}


_ARCH_OF = {"classifier": "adm", "toy_classifier": "toy_mlp", "resnet_classifier": "resnet"}


def export_experts(ckpt: dict, ckpt_path: str | Path, name: str, out: str | Path, fp16: bool = True,
                   meta: dict | None = None) -> list[Path]:
    """The merged experts of an ``ExpertDistillation`` checkpoint: ``<name>_expert<k>.pt`` / ``.json`` per expert
    and ``<name>.yaml`` (``model.init_args.classifier``: the expert list). Returns the written paths."""
    import yaml

    from tailgen.module.distill import merged_experts

    nets, ranges, spec = merged_experts(ckpt)
    hp = {k: v for k, v in dict(ckpt["hyper_parameters"]).items() if not k.startswith("_")}
    out, written, entries = Path(out), [], []
    for k, (net, t_range) in enumerate(zip(nets, ranges, strict=True)):
        sd = {n: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for n, v in net.state_dict().items()}
        pt, js = out / f"{name}_expert{k}.pt", out / f"{name}_expert{k}.json"
        atomic_write(pt, lambda p, sd=sd: torch.save(sd, p))
        info = {
            "name": pt.stem, "kind": "classifier", "arch": _ARCH_OF[spec.kind], "flags": spec.flags_resolved,
            "diffusion": dict(hp.get("diffusion") or spec.diffusion_flags),
            "num_classes": spec.flags_resolved.get("num_classes"), "null_label": None, "trainer": hp,
            "source": {"checkpoint": str(ckpt_path), "global_step": int(ckpt.get("global_step", -1)),
                       "epoch": int(ckpt.get("epoch", -1)), "weights": f"net.experts.{k} (LoRA merged)"},
            "dtype": "float16" if fp16 else "float32",
            "num_params": int(sum(p.numel() for p in net.parameters())),
            "meta": {**(meta or {}), "expert": {"index": k, "of": len(nets), "t_range": list(t_range), "fixed_t": 0}},
        }
        atomic_write(js, lambda p, info=info: p.write_text(json.dumps(info, indent=2) + "\n"))
        base = {"preset": spec.preset} if spec.preset else {"flags": spec.flags_resolved}
        entries.append({"class_path": "tailgen.models.spec.ExpertSpec",  # class_path: merges over a NetworkSpec
                        "init_args": {**base, "checkpoint": str(pt), "t_range": list(t_range), "fixed_t": 0}})
        written += [pt, js]
    fragment = out / f"{name}.yaml"
    text = (f"# PPAP experts exported from {ckpt_path} (step {int(ckpt.get('global_step', -1))}): the classifier of\n"
            "# any classifier-based guidance, e.g. tailgen predict --config configs/fashion/adm_g.yaml "
            f"--config {fragment}\n" + yaml.safe_dump({"model.init_args.classifier": entries}, sort_keys=False,
                                                      default_flow_style=None, width=120))
    atomic_write(fragment, lambda p: p.write_text(text))
    return [*written, fragment]


def export(ckpt_path: str | Path, name: str, out: str | Path = "tailgen/weights", fp16: bool = True,
           meta: dict | None = None) -> tuple[Path, ...]:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hp = dict(ckpt["hyper_parameters"])
    class_path = str(hp.get("_class_path", ""))
    if class_path.endswith("ExpertDistillation") or "expert_t_ranges" in ckpt:
        return tuple(export_experts(ckpt, ckpt_path, name, out, fp16, meta))
    kind = next((k for cls, k in _KINDS.items() if class_path.endswith(cls)), None)
    if kind is None:
        kind = ("upsampler" if "large_size" in hp["network"] else "model") if "label_dropout" in hp else "classifier"
    sd, which = ema_state_dict(ckpt)
    sd = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    arch, flags = hp.get("arch", "adm"), dict(hp["network"])
    net = build_network(kind, flags, arch=arch)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    out = Path(out)
    pt, js = out / f"{name}.pt", out / f"{name}.json"
    atomic_write(pt, lambda p: torch.save(sd, p))
    num_classes = hp.get("num_classes", flags.get("num_classes"))
    info = {
        "name": name,
        "kind": kind,
        "arch": arch,
        "flags": flags,
        "diffusion": dict(hp.get("diffusion") or {}),
        "num_classes": num_classes if kind != "classifier" else flags.get("num_classes"),
        "null_label": num_classes if kind != "classifier" and hp.get("label_dropout", 0) > 0 else None,
        "trainer": {k: v for k, v in hp.items() if k not in ("network", "diffusion") and not k.startswith("_")},
        "source": {"checkpoint": str(ckpt_path), "global_step": int(ckpt.get("global_step", -1)),
                   "epoch": int(ckpt.get("epoch", -1)), "weights": which},
        "dtype": "float16" if fp16 else "float32",
        "num_params": int(sum(p.numel() for p in net.parameters())),
        "meta": meta or {},
    }
    atomic_write(js, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))
    return pt, js


def load_exported(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """``(network in eval mode, float32, info JSON)`` for ``<name>.pt`` / ``<name>.json`` written by :func:`export`."""
    from tailgen.models.checkpoint import load_into, load_state_dict_file

    pt = Path(path).with_suffix(".pt")
    info = json.loads(pt.with_suffix(".json").read_text())
    net = build_network(info["kind"], info["flags"], arch=info["arch"])
    load_into(net, load_state_dict_file(pt), device=device)
    return net.float().eval().requires_grad_(False), info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", default="tailgen/weights")
    ap.add_argument("--fp32", action="store_true", help="keep float32 (default: float16 storage)")
    ap.add_argument("--meta", default="{}", help="JSON dict stored under 'meta' (measured accuracies, commands)")
    a = ap.parse_args(argv)
    for path in export(a.checkpoint, a.name, a.out, fp16=not a.fp32, meta=json.loads(a.meta)):
        print(f"wrote {path}" + (f" ({path.stat().st_size / 1e6:.2f} MB)" if path.suffix == ".pt" else ""))


if __name__ == "__main__":
    main()
