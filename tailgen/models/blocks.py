"""Residual, down/up-sampling blocks and the shared encoder torso of the ADM UNet (IDDPM / ADM, Dhariwal &
Nichol 2021, Sec. 3 "Architecture improvements": BigGAN residual up/down-sampling, adaptive GroupNorm)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tailgen.models.attention import AttentionBlock
from tailgen.models.nn import (
    TimestepBlock,
    TimestepEmbedSequential,
    avg_pool_nd,
    conv_nd,
    maybe_checkpoint,
    normalization,
    zero_module,
)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (`conv`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        elif x.dim() == 4 and x.is_contiguous() and not _needs_grad(x):
            x = nearest_2x(x)
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


def _needs_grad(x: torch.Tensor) -> bool:
    """Autograd records this call (training, gradient guidance): the fast paths below are for sampling only."""
    return torch.is_grad_enabled() and x.requires_grad


def nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of a row-major (B, C, H, W) tensor: each pixel copied into a 2x2 block.

    Bit-identical to ``F.interpolate(x, scale_factor=2, mode="nearest")`` (a pure copy), as two broadcast copies
    (columns, then rows), which on the CPU take 0.15-0.4x the time of that kernel on NCHW tensors (issue 11)."""
    b, c, h, w = x.shape
    x = x[..., None].expand(b, c, h, w, 2).reshape(b, c, h, 2 * w)
    return x[:, :, :, None].expand(b, c, h, 2, 2 * w).reshape(b, c, 2 * h, 2 * w)


def average_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling (stride 2) of a float32 / float64 (B, C, H, W) tensor with even H, W, without autograd:
    (((x00 + x01) + x10) + x11) / 4, the summation order of ``F.avg_pool2d(x, 2)``, so bit-identical to it (which
    accumulates float16 / bfloat16 in float32: those keep avg_pool2d), at about half its time on NCHW CPU tensors
    (issue 11)."""
    out = x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2]
    out += x[:, :, 1::2, 0::2]
    out += x[:, :, 1::2, 1::2]
    return out.div_(4)


class Downsample(nn.Module):
    """2x downsampling: stride-2 3x3 conv (`op`) when `use_conv`, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)
        self.fast_pool = dims == 2 and not use_conv  # 2x2 average pooling: `average_2x2` when it is exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fast_pool and x.dim() == 4 and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
                and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and not _needs_grad(x)):
            return average_2x2(x)
        return self.op(x)


class ResBlock(TimestepBlock):
    """ADM residual block conditioned on the embedding.

    h = conv(SiLU(GN(x))) [resampled between SiLU and conv when up/down]; with scale-shift norm
    (scale, shift) = Linear(SiLU(emb)).chunk(2) and h = GN(h) * (1 + scale) + shift, otherwise h = h + emb;
    then SiLU, dropout, zero-initialised conv; output = skip(x) + h.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)):
            return self._forward_in_place(x, emb)
        if self.updown:
            norm, act, conv = self.in_layers
            h = conv(self.h_upd(act(norm(x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self._emb_out(emb, h)
        if self.use_scale_shift_norm:
            out_norm, *out_rest = self.out_layers
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            for layer in out_rest:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

    def _emb_out(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        emb_out = self.emb_layers(emb).to(h.dtype)
        return emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2)))

    def _forward_in_place(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The same operations in the same order as `_forward` (bit-identical) for sampling (no autograd, no
        autocast, so one dtype throughout): SiLU, the scale-shift and the residual sum write into the block's own
        fresh intermediates instead of allocating new ones (about 4 % of a CPU forward, issue 11)."""
        norm, _, conv = self.in_layers
        h = F.silu(norm(x), inplace=True)
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv(h)
        emb_out = self._emb_out(emb, h)
        out_norm, _, dropout, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h).mul_(1 + scale).add_(shift)
        else:
            h = out_norm(h + emb_out)
        h = out_conv(dropout(F.silu(h, inplace=True)))
        return h.add_(self.skip_connection(x))


@dataclass
class Torso:
    """Encoder half shared by the UNet and the classifier, with its channel bookkeeping."""

    input_blocks: nn.ModuleList
    middle_block: TimestepEmbedSequential
    input_block_chans: list[int]  # channels of every input block's output (the UNet skips)
    first_ch: int  # channels after the first conv
    ch: int  # channels at the bottom
    ds: int  # total downsampling factor


def build_torso(
    *,
    in_channels: int,
    model_channels: int,
    emb_dim: int,
    num_res_blocks: int,
    attention_resolutions,
    dropout: float,
    channel_mult,
    conv_resample: bool,
    dims: int,
    use_checkpoint: bool,
    num_heads: int,
    num_head_channels: int,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_new_attention_order: bool,
) -> Torso:
    """input_blocks (first conv, num_res_blocks ResBlocks [+ attention when the downsample rate is in
    `attention_resolutions`] per level, a down block between levels) and middle_block (Res, Attn, Res)."""
    res_kwargs = dict(dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)
    attn_kwargs = dict(
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        use_checkpoint=use_checkpoint,
        use_new_attention_order=use_new_attention_order,
    )
    ch = first_ch = int(channel_mult[0] * model_channels)
    input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
    input_block_chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out_ch = int(mult * model_channels)
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, dropout, out_channels=out_ch, **res_kwargs)]
            ch = out_ch
            if ds in attention_resolutions:
                layers.append(AttentionBlock(ch, **attn_kwargs))
            input_blocks.append(TimestepEmbedSequential(*layers))
            input_block_chans.append(ch)
        if level != len(channel_mult) - 1:
            if resblock_updown:
                down = ResBlock(ch, emb_dim, dropout, out_channels=ch, down=True, **res_kwargs)
            else:
                down = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
            input_blocks.append(TimestepEmbedSequential(down))
            input_block_chans.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential(
        ResBlock(ch, emb_dim, dropout, **res_kwargs),
        AttentionBlock(ch, **attn_kwargs),
        ResBlock(ch, emb_dim, dropout, **res_kwargs),
    )
    return Torso(input_blocks, middle_block, input_block_chans, first_ch, ch, ds)


def time_embedding_mlp(model_channels: int, time_embed_dim: int) -> nn.Sequential:
    """Linear(model_channels, 4C) -> SiLU -> Linear(4C, 4C): the `time_embed` MLP."""
    return nn.Sequential(
        nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
    )
