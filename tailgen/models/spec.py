"""`NetworkSpec`: a network described in YAML (preset name, flag overrides, checkpoint) and built frozen.

    network:
      preset: 64x64_diffusion
      checkpoint: /path/64x64_diffusion.pt
      flags: {use_fp16: false}        # optional overrides of the preset's builder flags

A network must have weights: a ``checkpoint`` or a tailgen preset whose weights ship in ``tailgen/weights``.
Random initialisation is an explicit opt-in (``random_init: true``, for speed benchmarks and smoke tests); without
it a network with no weights is a `ConfigError` naming the config key to set.
"""

from __future__ import annotations

from torch import nn

from tailgen.models.adm import DIFFUSION_FLAGS
from tailgen.models.checkpoint import load_checkpoint
from tailgen.models.experts import ClassifierExperts, check_ranges, ppap_ranges
from tailgen.models.presets import BUILDERS, PRESETS, build_network, get_preset
from tailgen.utils import CheckpointError, ConfigError

_DIFFUSION_NAMES = DIFFUSION_FLAGS | {"learn_sigma"}


class NetworkSpec:
    """Preset and/or explicit guided-diffusion flags + optional weights file (kind: model | classifier |
    upsampler; a preset sets the kind). `build()` returns the network in eval mode with gradients off."""

    def __init__(
        self,
        preset: str | None = None,
        flags: dict | None = None,
        checkpoint: str | None = None,
        kind: str = "model",
        prefix: str | None = None,
        random_init: bool = False,
    ):
        if preset is None and not flags:
            raise ConfigError(
                f"a network needs a preset or flags; presets: {', '.join(sorted(PRESETS))}"
            )
        self.preset = preset
        self.flags = dict(flags or {})
        # `--...checkpoint=null` over a config that sets a path reaches here as the string "None" (jsonargparse)
        self.checkpoint = None if checkpoint in ("", "None", "null") else checkpoint
        self.prefix = prefix
        self.random_init = bool(random_init)
        if preset is not None:
            self._preset = get_preset(preset)  # raises ConfigError listing the presets
            self.kind = self._preset["kind"]
        else:
            if kind not in BUILDERS:
                raise ConfigError(f"network kind must be one of {', '.join(BUILDERS)}, got {kind!r}")
            self._preset = None
            self.kind = kind
        if self.random_init and self.checkpoint:
            raise ConfigError(f"a network has both checkpoint={checkpoint!r} and random_init: true: drop one of them")

    @property
    def flags_resolved(self) -> dict:
        """Builder flags: the preset's flags updated by the explicit `flags`."""
        base = dict(self._preset["flags"]) if self._preset else {}
        return {**base, **self.flags}

    @property
    def diffusion_flags(self) -> dict:
        """Diffusion flags: the preset's, updated by any diffusion flags (and learn_sigma) in `flags`."""
        base = dict(self._preset["diffusion"]) if self._preset else {}
        base.update({name: value for name, value in self.flags.items() if name in _DIFFUSION_NAMES})
        if "learn_sigma" in self.flags_resolved and self.kind != "classifier":
            base["learn_sigma"] = self.flags_resolved["learn_sigma"]
        return base

    @property
    def sampling(self) -> dict:
        """The preset's sampling facts (e.g. ``num_classes`` without the null label, ``null_label``)."""
        return dict((self._preset or {}).get("sampling") or {})

    @property
    def weights(self) -> str | None:
        """The weights file: the checkpoint, else the file shipped with a tailgen preset, else None."""
        return self.checkpoint or (self._preset or {}).get("weights")

    def check_weights(self, key: str = "network") -> None:
        """ConfigError unless the network has weights or ``random_init`` is set; ``key`` is the config key of
        this spec (e.g. ``model.init_args.network``), named in the message."""
        if self.weights or self.random_init:
            return
        what = f"preset {self.preset!r}" if self.preset else "a network given by flags only"
        where = ""
        if self._preset and self._preset.get("untrained"):
            where = f" ({self._preset['untrained']})"
        elif self._preset and self._preset.get("url"):
            where = f" (the file {self._preset.get('file', self.preset + '.pt')} is at {self._preset['url']})"
        raise ConfigError(
            f"{key}: {what} has no weights: set {key}.checkpoint to its weights file{where}; "
            f"random weights only with {key}.random_init=true (benchmarks)"
        )

    def build(self, device="cpu", key: str = "network") -> nn.Module:
        """Network on `device`, weights loaded, `.eval()`, `requires_grad_(False)`.

        The weights are the checkpoint or, without one, those shipped with a tailgen preset (``tailgen/weights``);
        with neither, a ConfigError naming ``key`` (see `check_weights`) unless ``random_init``. Weights are loaded
        into a network built on the meta device (no random initialisation, no second copy)."""
        self.check_weights(key)
        checkpoint = self.weights
        if checkpoint:
            model = build_network(self.kind, self.flags_resolved, device="meta")
            try:
                load_checkpoint(model, checkpoint, prefix=self.prefix, device=device)
            except CheckpointError as error:  # name the config key that gave the file
                if str(error).startswith(f"{key}."):
                    raise
                raise CheckpointError(f"{key}.checkpoint: {error}") from None
        else:
            model = build_network(self.kind, self.flags_resolved, device=device)
        return model.eval().requires_grad_(False)

    def __repr__(self) -> str:
        return (
            f"NetworkSpec(preset={self.preset!r}, flags={self.flags!r}, checkpoint={self.checkpoint!r}, "
            f"kind={self.kind!r}" + (", random_init=True)" if self.random_init else ")")
        )


class ExpertSpec(NetworkSpec):
    """One PPAP classifier expert (``models/experts.py``): a `NetworkSpec` plus the timesteps it serves.

    ``model.init_args.classifier`` takes a list of these instead of one spec::

        classifier:
          - {preset: fashion_clean_classifier, checkpoint: experts/e0.pt, t_range: [0, 499], fixed_t: 0}
          - {preset: fashion_clean_classifier, checkpoint: experts/e1.pt, t_range: [500, 999], fixed_t: 0}

    Args:
        t_range: inclusive [lo, hi] of original timesteps this expert serves; leave it out on every expert for
            PPAP's equal split of 0..T-1 (``experts.ppap_ranges``).
        fixed_t: call this expert with this timestep whatever the sample's (0 for experts made from a clean
            classifier, which PPAP feeds x only); None: the sample's timestep.
        preset, flags, checkpoint, kind, prefix, random_init: as `NetworkSpec` (kind defaults to classifier).
    """

    def __init__(self, preset: str | None = None, flags: dict | None = None, checkpoint: str | None = None,
                 kind: str = "classifier", prefix: str | None = None, random_init: bool = False,
                 t_range: list[int] | None = None, fixed_t: int | None = None):
        super().__init__(preset=preset, flags=flags, checkpoint=checkpoint, kind=kind, prefix=prefix,
                         random_init=random_init)
        if t_range is not None and (len(t_range) != 2 or not 0 <= t_range[0] <= t_range[1]):
            raise ConfigError(f"an expert's t_range must be [lo, hi] with 0 <= lo <= hi, got {t_range}")
        if fixed_t is not None and (isinstance(fixed_t, bool) or int(fixed_t) != fixed_t or fixed_t < 0):
            raise ConfigError(f"an expert's fixed_t must be a non-negative integer or null, got {fixed_t!r}")
        self.t_range = None if t_range is None else [int(t_range[0]), int(t_range[1])]
        self.fixed_t = None if fixed_t is None else int(fixed_t)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", t_range={self.t_range!r}, fixed_t={self.fixed_t!r})"


def build_experts(specs: list[NetworkSpec], num_timesteps: int, key: str = "model.init_args.classifier"):
    """``ClassifierExperts`` from expert specs (plain `NetworkSpec`s count as experts without a range): every
    spec's weights are checked before any loads; t_ranges on all specs or on none (PPAP's equal split)."""
    ranges = [getattr(spec, "t_range", None) for spec in specs]
    if all(r is None for r in ranges):
        ranges = ppap_ranges(len(specs), num_timesteps)
    elif any(r is None for r in ranges):
        missing = [k for k, r in enumerate(ranges) if r is None]
        raise ConfigError(f"{key}: give t_range on every expert or on none (PPAP's equal split); "
                          f"expert(s) {missing} have none")
    ranges = check_ranges(ranges, num_timesteps, key=f"{key} t_range")
    for k, spec in enumerate(specs):
        spec.check_weights(f"{key}.{k}")
    nets = [spec.build(key=f"{key}.{k}") for k, spec in enumerate(specs)]
    return ClassifierExperts(nets, ranges, [getattr(spec, "fixed_t", None) for spec in specs]).eval().requires_grad_(False)
