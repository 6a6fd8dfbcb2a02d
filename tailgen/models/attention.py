"""Self-attention of the ADM UNet and the attention-pool head of its classifier.

The reference scales q and k each by ch^(-1/4) and takes a float32 softmax of q^T k; that equals scaled
dot-product attention with scale 1/sqrt(ch). Each attention module has ``use_sdpa``: None ("auto", the default)
takes `F.scaled_dot_product_attention` on accelerators and, on CPU, for sequences of at least
``CPU_SDPA_MIN_TOKENS`` (its fused flash kernel never materialises the T x T scores: 2.6x faster in float32, 3-6x in
bf16 at T = 1024 on the 64x64 UNet's shapes), and the explicit matmul form for shorter ones on CPU (0.6-1.1x there,
docs/bench/2026-12-01_s6_attention.md); True / False force one form (``models/speed.set_attention``, the
``attention: matmul | sdpa | auto`` option).
Two channel layouts of the fused qkv tensor (B, 3 * heads * ch, T) exist and must be kept exact:

* legacy (`QKVAttentionLegacy`): heads first, then q/k/v inside each head -> view (B, heads, 3, ch, T);
* new (`QKVAttention`, `use_new_attention_order=True`): q/k/v first, then heads -> view (B, 3, heads, ch, T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tailgen.models.nn import conv_nd, maybe_checkpoint, normalization, zero_module
from tailgen.utils import ConfigError

CPU_SDPA_MIN_TOKENS = 1024  # "auto" on CPU: SDPA from 32x32 feature maps up, the matmul form below


def qkv_attention(
    qkv: torch.Tensor, num_heads: int, new_order: bool, num_queries: int | None = None, use_sdpa: bool | None = None
) -> torch.Tensor:
    """Multi-head attention over a fused (B, 3*C, T) qkv tensor; returns (B, C, Tq).

    `num_queries` limits the queries to the first tokens (the attention pool only needs token 0);
    `use_sdpa` None picks SDPA off-CPU and on CPU from ``CPU_SDPA_MIN_TOKENS`` tokens, else the explicit form.
    """
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if new_order:
        q, k, v = qkv.view(batch, 3, num_heads, ch, length).unbind(1)
    else:
        q, k, v = qkv.view(batch, num_heads, 3, ch, length).unbind(2)
    if num_queries is not None:
        q = q[..., :num_queries]
    if use_sdpa is None:
        use_sdpa = qkv.device.type != "cpu" or length >= CPU_SDPA_MIN_TOKENS
    if use_sdpa:
        # (B, heads, ch, T) -> (B, heads, T, ch), contiguous: the fused kernels need unit stride in the last dim
        # (with a strided view, CPU SDPA silently falls back to its slower math path).
        q, k, v = (tensor.transpose(-1, -2).contiguous() for tensor in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)
    else:
        # The explicit form, softmax(q^T k / sqrt(ch)) in float32.
        weight = torch.matmul(q.transpose(-1, -2) * ch**-0.5, k)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = torch.matmul(v, weight.transpose(-1, -2))
    return out.reshape(batch, num_heads * ch, -1)


def resolve_num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention layer: `channels // num_head_channels` if that is set (!= -1), else `num_heads`."""
    if num_head_channels == -1:
        if channels % num_heads:
            raise ConfigError(f"attention over {channels} channels cannot be split into num_heads={num_heads} heads")
        return num_heads
    if channels % num_head_channels:
        raise ConfigError(
            f"attention over {channels} channels is not divisible by num_head_channels={num_head_channels}; "
            "choose channel widths that are multiples of it or set num_head_channels=-1 and num_heads"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Residual spatial self-attention: x + proj_out(attention(qkv(GN(x)))), proj_out zero-initialised."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = resolve_num_heads(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))
        self.use_sdpa: bool | None = None  # None: "auto" (qkv_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, (x,), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        qkv = self.qkv(self.norm(x))
        h = self.proj_out(qkv_attention(qkv, self.num_heads, self.use_new_attention_order,
                                                 use_sdpa=self.use_sdpa))
        return (x + h).reshape(batch, channels, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (ADM classifier head, new head order).

    Tokens = [mean over positions, every position] + positional embedding (C, HW + 1); the output is the
    attention result of the mean token, projected by `c_proj` to `output_dim`.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None):
        super().__init__()
        self.spacial_dim = spacial_dim
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = resolve_num_heads(embed_dim, 1, num_heads_channels)
        self.use_sdpa: bool | None = None  # None: "auto" (qkv_attention)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output of the mean token before `c_proj`: (B, embed_dim)."""
        batch, channels, *spatial = x.shape
        tokens = x.reshape(batch, channels, -1)
        if tokens.shape[-1] + 1 != self.positional_embedding.shape[-1]:
            raise ConfigError(
                f"attention pool expects a {self.spacial_dim}x{self.spacial_dim} feature map (built for "
                f"image_size = {self.spacial_dim} * downsampling), got {tuple(spatial)}: feed images of the "
                "size the classifier was built for"
            )
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        tokens = tokens + self.positional_embedding[None].to(tokens.dtype)
        qkv = self.qkv_proj(tokens)
        return qkv_attention(qkv, self.num_heads, new_order=True, num_queries=1, use_sdpa=self.use_sdpa)[:, :, 0]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Apply the 1x1 `c_proj` to pooled features (B, C) -> (B, output_dim)."""
        return self.c_proj(pooled[:, :, None])[:, :, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pooled(x))
