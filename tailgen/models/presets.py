"""Presets of the official guided-diffusion checkpoints (ADM, Dhariwal & Nichol 2021, openai/guided-diffusion
README "Download pre-trained models" / "Sampling from pre-trained models").

`PRESETS[name] = {"kind": "model" | "classifier" | "upsampler", "flags": full builder flags,
"diffusion": diffusion flags, "file": official file name, "url": download address,
"sampling": the README's sampling settings}`. `flags` are the builder's defaults overridden by the README's
MODEL_FLAGS (classifiers: `classifier_defaults()` + the README classifier flags), including `use_fp16` as the
README sets it; override it with `flags={"use_fp16": False}` for float32 torsos.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from tailgen.models.adm import (
    DIFFUSION_DEFAULTS,
    classifier_defaults,
    create_classifier,
    create_model,
    create_superres_model,
    model_defaults,
    superres_defaults,
)
from tailgen.models.resnet import create_resnet_classifier
from tailgen.models.toy import ToyClassifier, ToyDenoiser
from tailgen.utils import ConfigError

OFFICIAL_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
BUILDERS = {"model": create_model, "classifier": create_classifier, "upsampler": create_superres_model,
            "toy_denoiser": ToyDenoiser, "toy_classifier": ToyClassifier, "resnet_classifier": create_resnet_classifier}
_DEFAULTS = {"model": model_defaults, "classifier": classifier_defaults, "upsampler": superres_defaults,
             "toy_denoiser": dict, "toy_classifier": dict, "resnet_classifier": dict}
# The trainers and exported weights name a network by (arch, "model" | "classifier"); the builder kind it maps to:
ARCHS = ("adm", "toy_mlp", "resnet")
_ARCH_KINDS = {("toy_mlp", "model"): "toy_denoiser", ("toy_mlp", "classifier"): "toy_classifier",
               ("resnet", "classifier"): "resnet_classifier"}
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

PRESETS: dict[str, dict] = {}
_MANIFEST_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def register_preset(
    name: str, kind: str, flags: dict, diffusion: dict, file: str | None = None, url: str | None = None, **extra
) -> dict:
    """Add a preset: `flags` override the builder defaults of `kind`, `diffusion` the diffusion defaults."""
    if kind not in BUILDERS:
        raise ConfigError(f"preset kind must be one of {', '.join(BUILDERS)}, got {kind!r}")
    full_flags = {**_DEFAULTS[kind](), **flags}
    full_diffusion = {**DIFFUSION_DEFAULTS, **diffusion}
    PRESETS[name] = dict(kind=kind, flags=full_flags, diffusion=full_diffusion, file=file, url=url, **extra)
    _MANIFEST_CACHE.pop(name, None)
    return PRESETS[name]


def _official(name: str, kind: str, flags: dict, diffusion: dict, **sampling) -> None:
    register_preset(
        name, kind, flags, diffusion, file=f"{name}.pt", url=f"{OFFICIAL_URL}{name}.pt", sampling=sampling
    )


_ADM_COMMON = dict(
    attention_resolutions="32,16,8",
    class_cond=True,
    learn_sigma=True,
    resblock_updown=True,
    use_fp16=True,
    use_scale_shift_norm=True,
)
_COSINE = dict(diffusion_steps=1000, noise_schedule="cosine", learn_sigma=True)
_LINEAR = dict(diffusion_steps=1000, noise_schedule="linear", learn_sigma=True)

_official(
    "64x64_diffusion", "model",
    dict(_ADM_COMMON, image_size=64, num_channels=192, num_head_channels=64, num_res_blocks=3, dropout=0.1,
         use_new_attention_order=True),
    _COSINE, timestep_respacing="250", classifier="64x64_classifier", classifier_scale=1.0,
)
_official(
    "128x128_diffusion", "model",
    dict(_ADM_COMMON, image_size=128, num_channels=256, num_heads=4, num_res_blocks=2),
    _LINEAR, timestep_respacing="250", classifier="128x128_classifier", classifier_scale=0.5,
)
_official(
    "256x256_diffusion", "model",
    dict(_ADM_COMMON, image_size=256, num_channels=256, num_head_channels=64, num_res_blocks=2),
    _LINEAR, timestep_respacing="250", classifier="256x256_classifier", classifier_scale=1.0,
)
_official(
    "256x256_diffusion_uncond", "model",
    dict(_ADM_COMMON, image_size=256, num_channels=256, num_head_channels=64, num_res_blocks=2, class_cond=False),
    _LINEAR, timestep_respacing="250", classifier="256x256_classifier", classifier_scale=10.0,
)
_official(
    "512x512_diffusion", "model",
    dict(_ADM_COMMON, image_size=512, num_channels=256, num_head_channels=64, num_res_blocks=2, use_fp16=False),
    _LINEAR, timestep_respacing="250", classifier="512x512_classifier", classifier_scale=4.0,
)
# Classifiers: classifier_defaults() (width 128, depth 2, attention 32,16,8, attention pool, fp32) + README flags.
_official("64x64_classifier", "classifier", dict(image_size=64, classifier_depth=4), _COSINE)
_official("128x128_classifier", "classifier", dict(image_size=128), _LINEAR)
_official("256x256_classifier", "classifier", dict(image_size=256), _LINEAR)
_official("512x512_classifier", "classifier", dict(image_size=512), _LINEAR)
# Upsamplers: sr_model_and_diffusion_defaults() + README "Upsampling" MODEL_FLAGS (legacy attention order).
_official(
    "64_256_upsampler", "upsampler",
    dict(_ADM_COMMON, large_size=256, small_size=64, num_channels=192, num_heads=4, num_res_blocks=2),
    _LINEAR, timestep_respacing="250",
)
_official(
    "128_512_upsampler", "upsampler",
    dict(_ADM_COMMON, attention_resolutions="32,16", large_size=512, small_size=128, num_channels=192,
         num_head_channels=64, num_res_blocks=2),
    _LINEAR, timestep_respacing="250",
)

# tailgen's own Fashion-MNIST cascade, 14x14 -> 28x28. Not trained yet: no weights ship, so each needs a checkpoint
# (or random_init for smoke tests). The flags are those of the training configs (tests/test_module_super_res.py checks
# it); a trained file exported as tailgen/weights/<name>.{pt,json} replaces the entry (registered below).
_FASHION_CASCADE = dict(in_channels=1, num_channels=32, attention_resolutions="7", num_head_channels=32,
                        learn_sigma=True, class_cond=True, num_classes=11, dropout=0.0, use_scale_shift_norm=True,
                        resblock_updown=True, use_new_attention_order=True)
_FASHION_COSINE = dict(diffusion_steps=1000, noise_schedule="cosine", learn_sigma=True)
# First stage: a class-conditional UNet on Fashion-MNIST area-downsampled to 14x14
# (configs/fashion/train_diffusion_14.yaml).
register_preset(
    "fashion_diffusion_14", "model",
    dict(_FASHION_CASCADE, image_size=14, num_res_blocks=2, channel_mult="1,2"),
    _FASHION_COSINE,
    sampling={"num_classes": 10, "null_label": 10},
    untrained="no trained weights exist yet: train it with tailgen fit --config "
              "configs/fashion/train_diffusion_14.yaml and export it as fashion_diffusion_14 "
              "(configs/fashion/README.md)",
)
# Second stage: the fashion_diffusion torso on [x, resized low_res] (configs/fashion/train_upsampler_14_28.yaml).
register_preset(
    "fashion_upsampler", "upsampler",
    dict(_FASHION_CASCADE, large_size=28, small_size=14, num_res_blocks=1, channel_mult="1,2,2"),
    _FASHION_COSINE,
    sampling={"num_classes": 10, "null_label": 10},
    untrained="no trained weights exist yet: train it with tailgen fit --config "
              "configs/fashion/train_upsampler_14_28.yaml and export it as fashion_upsampler "
              "(configs/fashion/README.md)",
)


def get_preset(name: str) -> dict:
    """A deep copy of `PRESETS[name]`; unknown names raise ConfigError listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown network preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def builder_kind(kind: str, arch: str | None = None) -> str:
    """The ``BUILDERS`` key of a network named the trainers' way: ``arch`` "adm" (or None: ``kind`` is already a
    builder kind) keeps ``kind``; "toy_mlp" -> ``toy_denoiser`` / ``toy_classifier``; "resnet" classifier ->
    ``resnet_classifier``."""
    if arch is not None and arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if arch in (None, "adm"):
        return kind
    if (arch, kind) not in _ARCH_KINDS:
        raise ConfigError(f"arch {arch!r} has no {kind!r} network; "
                          f"{arch} builds: {', '.join(k for a, k in _ARCH_KINDS if a == arch)}")
    return _ARCH_KINDS[arch, kind]


def build_network(kind: str, flags: dict, device: str | torch.device = "cpu", arch: str | None = None) -> nn.Module:
    """Build a network of `kind` from builder flags; device "meta" builds shapes only (no memory, instant).

    With ``arch`` (the trainers' and exported weights' naming: "adm" | "toy_mlp" | "resnet"), ``kind`` is
    "model" | "classifier" and :func:`builder_kind` picks the builder."""
    kind = builder_kind(kind, arch)
    if kind not in BUILDERS:
        raise ConfigError(f"network kind must be one of {', '.join(BUILDERS)}, got {kind!r}")
    with torch.device(device):
        return BUILDERS[kind](**flags)


def build_preset(name: str, device: str | torch.device = "meta", **overrides) -> nn.Module:
    """Network of preset `name` (random/zero init on a real device; shapes only on "meta")."""
    preset = get_preset(name)
    return build_network(preset["kind"], {**preset["flags"], **overrides}, device)


def manifest_of(state_dict) -> dict[str, tuple[int, ...]]:
    """key -> shape of a state dict (order kept)."""
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def preset_manifest(name: str) -> dict[str, tuple[int, ...]]:
    """Cached key -> shape layout of preset `name` (built on the meta device)."""
    if name not in _MANIFEST_CACHE:
        _MANIFEST_CACHE[name] = manifest_of(build_preset(name, device="meta").state_dict())
    return dict(_MANIFEST_CACHE[name])


def presets_matching(manifest: dict[str, tuple[int, ...]]) -> list[str]:
    """Names of the presets whose key -> shape layout equals `manifest` exactly (key order ignored)."""
    return [name for name in PRESETS if preset_manifest(name) == manifest]


def register_shipped_weights(directory: Path = WEIGHTS_DIR) -> list[str]:
    """Register tailgen's own trained networks: each ``<name>.json`` written by ``tools/export_weights.py``
    (kind, arch, flags, diffusion, num_classes, null_label, ...) beside its ``<name>.pt`` becomes preset
    ``name``, whose ``weights`` load when no checkpoint is given."""
    names = []
    for meta_path in sorted(Path(directory).glob("*.json")):
        meta = json.loads(meta_path.read_text())
        kind = builder_kind(meta["kind"], meta.get("arch"))
        sampling = {"num_classes": meta.get("num_classes"), "null_label": meta.get("null_label")}
        register_preset(meta_path.stem, kind, meta["flags"], meta.get("diffusion", {}),
                        file=meta_path.with_suffix(".pt").name, weights=str(meta_path.with_suffix(".pt")),
                        sampling=sampling, info={k: meta.get(k) for k in ("source", "meta", "num_params")})
        names.append(meta_path.stem)
    return names


register_shipped_weights()
