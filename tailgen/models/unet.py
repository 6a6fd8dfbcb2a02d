"""ADM UNet (Dhariwal & Nichol 2021, Sec. 3; guided-diffusion `UNetModel`) and its super-resolution variant.

State-dict keys, shapes and numerics match guided-diffusion exactly: `time_embed`, `label_emb`,
`input_blocks`, `middle_block`, `output_blocks`, `out` in that order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tailgen.models.attention import AttentionBlock
from tailgen.models.blocks import ResBlock, Upsample, build_torso, time_embedding_mlp
from tailgen.models.nn import (
    TimestepEmbedSequential,
    as_timestep_tensor,
    conv_nd,
    convert_convs,
    normalization,
    timestep_embedding,
    zero_module,
)
from tailgen.utils import ConfigError


def check_labels(y, num_classes: int | None, batch_size: int | None = None, *,
                 fix: str = "pass labels of the network's classes") -> None:
    """The one label check (networks, ``GuidedDiffusion``, the sampling plan). Labels are required iff the network is
    class-conditional; with ``batch_size`` they must be an integer tensor of shape (batch_size,); every label must lie
    in 0..num_classes-1 (``y`` a tensor or array; ``fix`` ends the range message, e.g. "fix data.labels")."""
    if num_classes is None:
        if y is not None:
            raise ConfigError(
                "this network is unconditional (class_cond=False) but labels y were given; call it without y"
            )
        return
    if y is None:
        raise ConfigError(
            f"this network is class-conditional (num_classes={num_classes}): pass integer labels y of shape "
            f"({batch_size},)"
        )
    if batch_size is not None and (y.shape != (batch_size,) or y.dtype.is_floating_point or y.dtype == torch.bool):
        raise ConfigError(
            f"labels y must be an integer tensor of shape ({batch_size},), got {tuple(y.shape)} {y.dtype}"
        )
    # The range check reads the labels back (a graph break under torch.compile, a device sync on GPU); compiled
    # networks skip it: GuidedDiffusion checks the labels once per batch before sampling.
    y = torch.as_tensor(y)
    if y.numel() and not torch.compiler.is_compiling() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)].flatten()[0])
        raise ConfigError(f"label {bad} is out of range: the model has num_classes={num_classes} "
                          f"(classes 0..{num_classes - 1}); {fix}")


def check_class_emb(class_emb: torch.Tensor, y: torch.Tensor | None, num_classes: int | None,
                    shape: tuple[int, int]) -> None:
    """A precomputed class embedding replaces the labels: class-conditional network, no labels, shape (B, D)."""
    if num_classes is None:
        raise ConfigError("this network is unconditional (class_cond=False): it takes no class embedding")
    if y is not None:
        raise ConfigError("pass labels y or a class embedding class_emb, not both")
    if tuple(class_emb.shape) != shape or not class_emb.dtype.is_floating_point:
        raise ConfigError(f"class_emb must be a float tensor of shape {shape}, got {tuple(class_emb.shape)} "
                          f"{class_emb.dtype}")


class UNetModel(nn.Module):
    """ADM UNet: eps (and, with learned sigma, variance-interpolation v) prediction network.

    forward(x, timesteps, y=None, class_emb=None) -> (B, out_channels, H, W); x NCHW in [-1, 1]; timesteps are
    original step indices (int or float, scalar or (B,)); emb = MLP(sinusoid(t)) [+ label_emb(y)], or
    + class_emb when a precomputed (e.g. CADS-noised) class embedding is given instead of y.
    `attention_resolutions` are downsample rates (e.g. image 64 with "32,16,8" -> (2, 4, 8)).
    `use_fp16` keeps the convs of the torso in float16 (see `convert_to_fp16`).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions,
        dropout: float = 0.0,
        channel_mult=(1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        time_embed_dim = model_channels * 4
        self.time_embed = time_embedding_mlp(model_channels, time_embed_dim)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        torso = build_torso(
            in_channels=in_channels,
            model_channels=model_channels,
            emb_dim=time_embed_dim,
            num_res_blocks=num_res_blocks,
            attention_resolutions=self.attention_resolutions,
            dropout=dropout,
            channel_mult=self.channel_mult,
            conv_resample=conv_resample,
            dims=dims,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )
        self.input_blocks = torso.input_blocks
        self.middle_block = torso.middle_block

        res_kwargs = dict(dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)
        skip_chans = list(torso.input_block_chans)
        ch, ds = torso.ch, torso.ds
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers: list[nn.Module] = [
                    ResBlock(ch + skip_chans.pop(), time_embed_dim, dropout, out_channels=out_ch, **res_kwargs)
                ]
                ch = out_ch
                if ds in self.attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch,
                            num_heads=num_heads_upsample,
                            num_head_channels=num_head_channels,
                            use_checkpoint=use_checkpoint,
                            use_new_attention_order=use_new_attention_order,
                        )
                    )
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(ResBlock(ch, time_embed_dim, dropout, out_channels=ch, up=True, **res_kwargs))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, torso.first_ch, out_channels, 3, padding=1))
        )
        self.use_fp16 = False
        if use_fp16:
            self.convert_to_fp16()

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the torso (float16 after `convert_to_fp16`)."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> None:
        """Cast the conv weights/biases of input_blocks, middle_block, output_blocks to float16 (ADM rule:
        GroupNorm, Linear layers, label_emb and `out` stay float32)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            convert_convs(part, torch.float16)
        self.use_fp16 = True

    def convert_to_fp32(self) -> None:
        """Undo `convert_to_fp16`."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            convert_convs(part, torch.float32)
        self.use_fp16 = False

    def class_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """The class embedding the network adds to its time embedding: ``label_emb(y)`` (B, 4 * model_channels).

        Sampling-time guidances may change it (CADS) and pass it back as ``class_emb``."""
        if self.num_classes is None:
            raise ConfigError("this network is unconditional (class_cond=False): it has no class embedding")
        check_labels(y, self.num_classes, y.shape[0] if y is not None else 0)
        return self.label_emb(y)

    def embed(self, x: torch.Tensor, timesteps, y: torch.Tensor | None,
              class_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Time (+ class) embedding (B, 4 * model_channels); ``class_emb`` replaces ``label_emb(y)``."""
        timesteps = as_timestep_tensor(timesteps, x.shape[0], x.device)
        if class_emb is None:
            check_labels(y, self.num_classes, x.shape[0])
        else:
            check_class_emb(class_emb, y, self.num_classes, (x.shape[0], self.time_embed[-1].out_features))
        first_linear = self.time_embed[0]
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(first_linear.weight.dtype))
        if class_emb is not None:
            emb = emb + class_emb.to(emb.dtype)
        elif self.num_classes is not None:
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: torch.Tensor, timesteps, y: torch.Tensor | None = None,
                class_emb: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(x, timesteps, y, class_emb)
        skips = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(self.out[-1].weight.dtype))


class SuperResModel(UNetModel):
    """ADM upsampler: a UNet on [x, bilinear_resize(low_res, x's size)] (in_channels doubled).

    The resize is `F.interpolate(mode="bilinear", align_corners=False)`, no antialias, in the input dtype;
    the concatenated tensor is cast to the torso dtype only when it enters the torso (fixtures README 7.5).
    """

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)
        self.low_res_channels = in_channels

    def forward(
        self, x: torch.Tensor, timesteps, low_res: torch.Tensor | None = None, y: torch.Tensor | None = None,
        class_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if low_res is None:
            raise ConfigError("SuperResModel needs the low-resolution image: call model(x, t, low_res=..., y=...)")
        if low_res.dim() != 4 or low_res.shape[:2] != (x.shape[0], self.low_res_channels):
            raise ConfigError(
                f"low_res must have shape ({x.shape[0]}, {self.low_res_channels}, h, w), got {tuple(low_res.shape)}"
            )
        upsampled = F.interpolate(low_res.to(x.dtype), size=tuple(x.shape[2:]), mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, y, class_emb)
