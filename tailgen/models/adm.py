"""Builders from guided-diffusion's own flags (`script_util.py` names and defaults).

Paste MODEL_FLAGS / CLASSIFIER_FLAGS from guided-diffusion's README as keyword arguments (or as one string via
`flags_from_string`). Extensions with reference-compatible defaults: `in_channels=3`, `num_classes=1000`,
any `image_size` when `channel_mult` is given, and for the classifier `classifier_channel_mult`,
`classifier_num_head_channels=64`, `out_channels=num_classes`. Diffusion flags are accepted and ignored
(`tailgen.diffusion` consumes them).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping

from tailgen.models.encoder import POOLS, EncoderUNetModel
from tailgen.models.unet import SuperResModel, UNetModel
from tailgen.utils import ConfigError

NUM_CLASSES = 1000

# guided-diffusion's diffusion flags and their defaults (script_util.diffusion_defaults + create_gaussian_diffusion).
# The one definition: `tailgen.diffusion.DiffusionProcess.from_flags` builds the process from them, the presets fill
# each preset's diffusion dict with them and the builders below accept and ignore them. They live here, in the lowest
# layer that needs them (models, 1): diffusion (2) may import from models, not the other way round.
DIFFUSION_DEFAULTS = dict(
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    sigma_small=False,
)
# Flags the networks accept and ignore so one pasted dict serves model + diffusion (learn_sigma is used).
DIFFUSION_FLAGS = frozenset(DIFFUSION_DEFAULTS) - {"learn_sigma"}
SAMPLING_FLAGS = frozenset({"classifier_scale"})

# Built-in channel_mult of `create_model` / `create_classifier` for channel_mult "" (per image_size).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
# `sr_create_model` picks channel_mult from large_size.
SUPERRES_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def model_defaults() -> dict:
    """guided-diffusion `model_and_diffusion_defaults()` model part + tailgen extensions."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        learn_sigma=False,
        in_channels=3,
        num_classes=NUM_CLASSES,
    )


def classifier_defaults() -> dict:
    """guided-diffusion `classifier_defaults()` + tailgen extensions."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
        classifier_channel_mult="",
        classifier_num_head_channels=64,
        in_channels=3,
        num_classes=NUM_CLASSES,
        out_channels=None,  # None -> num_classes
    )


def superres_defaults() -> dict:
    """guided-diffusion `sr_model_and_diffusion_defaults()` model part + tailgen extensions."""
    defaults = model_defaults()
    for name in ("image_size", "channel_mult", "use_new_attention_order"):
        defaults.pop(name)
    defaults.update(large_size=256, small_size=64, channel_mult="", use_new_attention_order=False)
    return defaults


# Every flag a network builder takes (model, classifier, upsampler): what a pasted flag dict may hold besides the
# diffusion flags (`DiffusionProcess.from_flags` accepts and ignores them).
NETWORK_FLAGS = frozenset(model_defaults()) | frozenset(classifier_defaults()) | frozenset(superres_defaults())


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "y", "1", "false", "no", "n", "0"):
        return value.strip().lower() in ("true", "yes", "y", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"flag {name} expects a boolean (True/False), got {value!r}")


def _as_number(name: str, value, kind: type):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"flag {name} expects {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise ConfigError(f"flag {name} expects an integer, got {value!r}")
    return number


def _coerce(name: str, value, default):
    """Convert a pasted value (e.g. "True", "0.1") to the type of the flag's default."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        return _as_bool(name, value)
    if isinstance(default, int):
        return _as_number(name, value, int)
    if isinstance(default, float):
        return _as_number(name, value, float)
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def resolve_flags(flags: Mapping, defaults: Mapping, builder: str, ignored: Iterable[str] = ()) -> dict:
    """defaults updated by `flags`; unknown names raise ConfigError listing the valid ones."""
    ignored = set(ignored)
    unknown = sorted(set(flags) - set(defaults) - ignored)
    if unknown:
        raise ConfigError(
            f"{builder}: unknown flag(s) {', '.join(unknown)}. Valid flags: {', '.join(sorted(defaults))}"
            + (f" (accepted and ignored: {', '.join(sorted(ignored))})" if ignored else "")
        )
    resolved = dict(defaults)
    for name, value in flags.items():
        if name in defaults:
            resolved[name] = _coerce(name, value, defaults[name])
    return resolved


def parse_channel_mult(channel_mult, image_size: int, table: Mapping[int, tuple], size_name: str = "image_size"):
    """"1,2,3,4" / (1, 2, 3, 4) / "" (built-in default for the resolution) -> tuple of numbers."""
    if channel_mult in ("", None, ()):
        if image_size not in table:
            raise ConfigError(
                f"no built-in channel_mult for {size_name}={image_size} (built-in: "
                f"{', '.join(str(size) for size in sorted(table))}); pass channel_mult explicitly, e.g. \"1,2,2\""
            )
        return tuple(table[image_size])
    items = channel_mult.split(",") if isinstance(channel_mult, str) else list(channel_mult)
    try:
        values = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise ConfigError(f"channel_mult must be numbers like \"1,2,3,4\", got {channel_mult!r}") from None
    if not values or any(value <= 0 for value in values):
        raise ConfigError(f"channel_mult must be positive numbers, got {channel_mult!r}")
    return tuple(int(value) if value.is_integer() else value for value in values)


def attention_downsample_rates(attention_resolutions, image_size: int) -> tuple[int, ...]:
    """Resolutions "32,16,8" (pixels) -> downsample rates image_size // res, as the reference does."""
    if attention_resolutions in ("", None):
        return ()
    items = attention_resolutions.split(",") if isinstance(attention_resolutions, str) else attention_resolutions
    try:
        resolutions = [int(item) for item in items]
    except (TypeError, ValueError):
        raise ConfigError(f"attention_resolutions must be integers like \"32,16,8\", got {attention_resolutions!r}") from None
    return tuple(image_size // resolution for resolution in resolutions)


def _check_geometry(image_size: int, channel_mult: tuple, channels: Iterable[int], size_name: str) -> None:
    levels = len(channel_mult)
    if image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"{size_name}={image_size} is not divisible by 2^{levels - 1} (channel_mult has {levels} levels); "
            "use fewer levels or pad the images"
        )
    for width in channels:
        if width % 32:
            raise ConfigError(
                f"channel width {width} is not a multiple of 32 (GroupNorm uses 32 groups); "
                "choose num_channels / channel_mult accordingly"
            )


def create_model(**flags) -> UNetModel:
    """`create_model` of guided-diffusion: UNetModel from model flags (diffusion flags accepted, ignored).

    out_channels = 6 with learn_sigma (eps + v) else 3 (times in_channels / 3 for other channel counts);
    label_emb only with class_cond. use_fp16=True converts the torso convs to float16.
    """
    f = resolve_flags(flags, model_defaults(), "create_model", DIFFUSION_FLAGS)
    channel_mult = parse_channel_mult(f["channel_mult"], f["image_size"], DEFAULT_CHANNEL_MULT)
    _check_geometry(f["image_size"], channel_mult, (int(m * f["num_channels"]) for m in channel_mult), "image_size")
    return UNetModel(
        image_size=f["image_size"],
        in_channels=f["in_channels"],
        model_channels=f["num_channels"],
        out_channels=f["in_channels"] * (2 if f["learn_sigma"] else 1),
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=attention_downsample_rates(f["attention_resolutions"], f["image_size"]),
        dropout=f["dropout"],
        channel_mult=channel_mult,
        num_classes=f["num_classes"] if f["class_cond"] else None,
        use_checkpoint=f["use_checkpoint"],
        use_fp16=f["use_fp16"],
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
    )


def create_classifier(**flags) -> EncoderUNetModel:
    """`create_classifier` of guided-diffusion: EncoderUNetModel with 64-channel heads, legacy attention
    order, num_res_blocks = classifier_depth, 1000 logits (diffusion flags and classifier_scale ignored)."""
    f = resolve_flags(
        flags, classifier_defaults(), "create_classifier", DIFFUSION_FLAGS | SAMPLING_FLAGS | {"learn_sigma"}
    )
    if f["classifier_pool"] not in POOLS:
        raise ConfigError(f"classifier_pool {f['classifier_pool']!r} is not one of {', '.join(POOLS)}")
    image_size, width = f["image_size"], f["classifier_width"]
    channel_mult = parse_channel_mult(f["classifier_channel_mult"], image_size, DEFAULT_CHANNEL_MULT)
    _check_geometry(image_size, channel_mult, (int(m * width) for m in channel_mult), "image_size")
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=f["in_channels"],
        model_channels=width,
        out_channels=f["out_channels"] if f["out_channels"] is not None else f["num_classes"],
        num_res_blocks=f["classifier_depth"],
        attention_resolutions=attention_downsample_rates(f["classifier_attention_resolutions"], image_size),
        channel_mult=channel_mult,
        use_fp16=f["classifier_use_fp16"],
        num_head_channels=f["classifier_num_head_channels"],
        use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
        resblock_updown=f["classifier_resblock_updown"],
        pool=f["classifier_pool"],
    )


def create_superres_model(**flags) -> SuperResModel:
    """`sr_create_model` of guided-diffusion: SuperResModel at `large_size` (small_size is ignored: low_res
    is resized to x's size). Legacy attention order unless use_new_attention_order (tailgen extension)."""
    defaults = superres_defaults()
    if "image_size" in flags:
        raise ConfigError("create_superres_model: the upsampler's resolution flag is large_size, not image_size")
    f = resolve_flags(flags, defaults, "create_superres_model", DIFFUSION_FLAGS)
    size = f["large_size"]
    channel_mult = parse_channel_mult(f["channel_mult"], size, SUPERRES_CHANNEL_MULT, "large_size")
    _check_geometry(size, channel_mult, (int(m * f["num_channels"]) for m in channel_mult), "large_size")
    return SuperResModel(
        image_size=size,
        in_channels=f["in_channels"],
        model_channels=f["num_channels"],
        out_channels=f["in_channels"] * (2 if f["learn_sigma"] else 1),
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=attention_downsample_rates(f["attention_resolutions"], size),
        dropout=f["dropout"],
        channel_mult=channel_mult,
        num_classes=f["num_classes"] if f["class_cond"] else None,
        use_checkpoint=f["use_checkpoint"],
        use_fp16=f["use_fp16"],
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
    )


def flags_from_string(text: str) -> dict:
    """Parse a README flag string ("--image_size 64 --class_cond True ...") into a dict of strings.

    The create_* builders convert the strings to each flag's type.
    """
    tokens = shlex.split(text)
    flags: dict[str, str] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--"):
            raise ConfigError(f"expected a --flag in {text!r}, got {token!r}")
        if "=" in token:
            name, value = token[2:].split("=", 1)
            index += 1
        else:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise ConfigError(f"flag {token} has no value in {text!r}")
            name, value = token[2:], tokens[index + 1]
            index += 2
        flags[name] = value
    return flags
