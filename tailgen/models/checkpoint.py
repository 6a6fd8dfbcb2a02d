"""Safe checkpoint loading: `torch.load(weights_only=True)` only, strict loading with one clear error.

tailgen never unpickles code. Files that are not plain tensors (+ dicts, lists, numbers, strings) are
refused with instructions on how to re-save them as a state dict.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tailgen.models.presets import OFFICIAL_URL, PRESETS, manifest_of, presets_matching
from tailgen.utils import CheckpointError

# Wrappers seen around state dicts: Lightning (`state_dict`), generic training loops, EMA helpers.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema_state_dict", "ema", "ema_model", "params")
MAX_LISTED = 8


def _where_official(path: Path) -> str:
    for name, preset in PRESETS.items():
        if preset.get("file") == path.name and preset.get("url"):
            return f"Download {path.name} (preset {name!r}) from {preset['url']}"
    return (
        f"The official ADM files (e.g. 64x64_diffusion.pt) are listed in guided-diffusion's README and served "
        f"from {OFFICIAL_URL}<name>.pt; tailgen.models.presets.PRESETS[name]['url'] gives each address"
    )


def load_state_dict_file(path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Read a weights file with `torch.load(path, map_location="cpu", weights_only=True)` and return its
    flat state dict (wrappers and an optional key `prefix` removed, see `extract_state_dict`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise CheckpointError(f"checkpoint file {what}: {path}. {_where_official(path)}.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes): copy or download it again. "
                              f"{_where_official(path)}.")
    with path.open("rb") as f:
        head = f.read(16)
    if is_safetensors(path, head):
        return extract_state_dict(_load_safetensors(path), prefix=prefix, source=str(path))
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # zip (torch.save) or a legacy pickle (protocol 2+)
        raise CheckpointError(
            f"{path} is not a PyTorch file (neither torch.save's zip format nor a legacy pickle; starts with "
            f"{head[:8]!r}): point the checkpoint at the .pt weights file. {_where_official(path)}."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "Unsupported global" in text:
            detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line), "")
            detail = detail.split(" was not an allowed global")[0]
            raise CheckpointError(
                f"{path} contains pickled Python objects besides tensors ({detail}). tailgen never unpickles code "
                "(torch.load weights_only=True). If you trust the file, re-save its weights as a plain state dict "
                "elsewhere: `sd = torch.load(path, weights_only=False); torch.save(sd['state_dict'] if 'state_dict' "
                "in sd else sd.state_dict(), 'weights.pt')` (tensors only), then point tailgen at weights.pt."
            ) from None
        raise CheckpointError(
            f"{path} is truncated or corrupt (unreadable pickle: {text.splitlines()[0] if text else error!r}); "
            f"download or copy it again (size {size} bytes). {_where_official(path)}."
        ) from None
    except PermissionError as error:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {error}") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{path} is truncated or corrupt and cannot be read as a PyTorch file ({first_line}); "
            f"download or copy it again (size {size} bytes). {_where_official(path)}."
        ) from None
    return extract_state_dict(obj, prefix=prefix, source=str(path))


def is_safetensors(path: Path, head: bytes) -> bool:
    """A safetensors file: 8-byte little-endian header length, then a JSON header starting with '{'."""
    return path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{" and
                                             0 < int.from_bytes(head[:8], "little") < path.stat().st_size)


def _load_safetensors(path: Path) -> dict:
    """Tensors of a safetensors file (weights only by design) when the ``safetensors`` package is installed."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is a safetensors file, and the safetensors package is not installed: `pip install safetensors` "
            "(tailgen then loads it, tensors only), or convert it where safetensors is available: "
            "`torch.save(safetensors.torch.load_file(path), 'weights.pt')` and point the checkpoint at weights.pt"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise CheckpointError(f"{path} is a safetensors file that cannot be read ({error}); copy it again") from None


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def key_prefixes(state_dict: Mapping) -> list[str]:
    """Distinct first components of the keys ("net.", "ema.", "input_blocks.", ...)."""
    return sorted({key.split(".", 1)[0] + "." for key in state_dict if "." in key})


def extract_state_dict(obj, prefix: str | None = None, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Flat `{key: tensor}` from a loaded object.

    Unwraps `{"state_dict": ...}` (Lightning), `{"model": ...}`, `{"ema": ...}` and similar; with `prefix`
    (e.g. "net." or "ema." for tailgen's trainers) keeps only the keys under it, prefix removed; a DDP
    "module." prefix on every key is removed.
    """
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        if prefix is not None and any(isinstance(k, str) and k.startswith(prefix) for k in obj):
            obj = {k: v for k, v in obj.items() if isinstance(k, str) and k.startswith(prefix)}
            break
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not _is_tensor_dict(obj):
        kinds = sorted({type(v).__name__ for v in obj.values()}) if isinstance(obj, Mapping) else []
        raise CheckpointError(
            f"{source} does not hold a state dict of tensors (found {type(obj).__name__}"
            + (f" with values {', '.join(kinds)}" if kinds else "")
            + f"); expected {{name: tensor}} or a wrapper with one of the keys {', '.join(WRAPPER_KEYS)}"
        )
    state = dict(obj)
    if prefix is not None:
        selected = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if not selected:
            raise CheckpointError(
                f"{source} has no keys under prefix {prefix!r}; prefixes present: {', '.join(key_prefixes(state))}"
            )
        return selected
    if all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def describe_layout(manifest: Mapping[str, tuple]) -> str | None:
    """"a classifier", "a diffusion UNet", "an upsampler" or None, judged from an ADM key -> shape layout."""
    if not any(key.startswith("input_blocks.") for key in manifest):
        return None
    if not any(key.startswith("output_blocks.") for key in manifest):
        return "classifier"
    first_conv = manifest.get("input_blocks.0.0.weight")
    out_conv = next((shape for key, shape in manifest.items() if key.startswith("out.") and len(shape) == 4), None)
    if first_conv is not None and out_conv is not None:
        out_channels = out_conv[0]
        if first_conv[1] == 2 * (out_channels // 2 if out_channels % 2 == 0 else out_channels):
            return "upsampler"
    return "model"


_KIND_WORDS = {
    "classifier": "a noisy-image classifier (EncoderUNetModel; create_classifier / kind 'classifier')",
    "model": "a diffusion UNet (UNetModel; create_model / kind 'model')",
    "upsampler": "a super-resolution upsampler (SuperResModel; create_superres_model / kind 'upsampler')",
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _network_kind(model: nn.Module) -> str | None:
    from tailgen.models.encoder import EncoderUNetModel
    from tailgen.models.unet import SuperResModel, UNetModel

    if isinstance(model, SuperResModel):
        return "upsampler"
    if isinstance(model, UNetModel):
        return "model"
    if isinstance(model, EncoderUNetModel):
        return "classifier"
    return None


def mismatch_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """None if `state_dict` fits `model` exactly (keys and shapes), else one message explaining the misfit."""
    expected = manifest_of(model.state_dict())
    given = manifest_of(state_dict)
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        f"{key}: file {list(given[key])} vs network {list(expected[key])}"
        for key in expected
        if key in given and given[key] != expected[key]
    ]
    if not (missing or unexpected or mismatched):
        return None
    file_kind, net_kind = describe_layout(given), _network_kind(model)
    wrong_kind = file_kind and net_kind and file_kind != net_kind
    lines = [f"checkpoint does not fit the {type(model).__name__} ({len(expected)} tensors; file has {len(given)})"
             + (f": {_article(file_kind)} {file_kind} file given as a "
                f"{net_kind if net_kind != 'model' else 'diffusion model'}." if wrong_kind else ".")]
    if wrong_kind:
        lines.append(
            f"  This file is {_KIND_WORDS[file_kind]}, but it was given as {_KIND_WORDS[net_kind]}: "
            f"{_article(file_kind)} {file_kind} file given as a {net_kind if net_kind != 'model' else 'diffusion model'}."
        )
    prefixes = key_prefixes(given)
    if unexpected and len(prefixes) <= 3 and all(
        any(f"{prefix}{key}" in given for key in expected) for prefix in prefixes
    ):
        lines.append(f"  The keys carry a prefix: load with prefix= one of {', '.join(prefixes)}.")
    fits = presets_matching(given)
    if fits:
        lines.append(f"  The file fits preset {', '.join(repr(name) for name in fits)} exactly: use that preset.")
    else:
        lines.append("  It fits none of the official presets; check the flags the file was trained with.")
    if missing:
        lines.append(f"  {len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatches: {_listing(mismatched)}")
    return "\n".join(lines)


def row_major(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the default (row-major, NCHW) strides: itself when it has them, else a copy.

    A file saved from a channels_last network keeps NHWC strides on the weights whose layout is ambiguous (one
    input channel, 1x1 kernels), which still count as contiguous. Loaded as they are (``assign=True``), they made
    the first convolution return NHWC activations and so ran the whole network channels_last unasked: on the CPU
    its GroupNorms are 2-8x slower there (issue 11). Memory layout is ``prepare_network``'s choice alone."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= size
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], device=None) -> nn.Module:
    """Strictly load `state_dict` into `model` and return it.

    Tensors are cast to each parameter's dtype (float16 files upcast into float32 modules, fp32 files into
    fp16-converted torsos). A model built on the meta device is materialised on `device` (default CPU), every
    tensor in the default row-major layout (`row_major`), whatever strides the file kept.
    Any key / shape mismatch raises one CheckpointError (see `mismatch_report`).
    """
    report = mismatch_report(model, state_dict)
    if report is not None:
        raise CheckpointError(report)
    targets = model.state_dict()
    on_meta = any(tensor.is_meta for tensor in targets.values())
    if on_meta:
        device = torch.device(device or "cpu")
        cast = {key: row_major(value.to(device=device, dtype=targets[key].dtype)) for key, value in state_dict.items()}
        model.load_state_dict(cast, strict=True, assign=True)
    else:
        model.load_state_dict(dict(state_dict), strict=True)
        if device is not None:
            model.to(device)
    return model


def load_checkpoint(model: nn.Module, path, prefix: str | None = None, device=None) -> nn.Module:
    """`load_into(model, load_state_dict_file(path, prefix), device)` with the path named in errors."""
    state = load_state_dict_file(path, prefix=prefix)
    try:
        return load_into(model, state, device=device)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
