"""ADM noisy-image classifier: the UNet encoder half plus a pooling head (Dhariwal & Nichol 2021, Sec. 4.1;
guided-diffusion `EncoderUNetModel`). Keys: `time_embed`, `input_blocks`, `middle_block`, `out`."""

from __future__ import annotations

import torch
from torch import nn

from tailgen.models.attention import AttentionPool2d
from tailgen.models.blocks import build_torso, time_embedding_mlp
from tailgen.models.nn import as_timestep_tensor, conv_nd, convert_convs, normalization, timestep_embedding, zero_module
from tailgen.utils import ConfigError

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class EncoderUNetModel(nn.Module):
    """Timestep-conditioned encoder with a classification head; forward(x, timesteps) -> logits (B, out).

    Pools: "adaptive" (GN, SiLU, global average, zero-init 1x1 conv), "attention" (GN, SiLU,
    `AttentionPool2d` over the (image_size / ds)^2 grid + mean token), "spatial" (MLP on the spatial means
    of every input block and the middle block; ReLU) and "spatial_v2" (same MLP with GroupNorm + SiLU).
    `forward_features` returns the penultimate vector (the input of the head's final projection).
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
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"unknown classifier pool {pool!r}; valid pools: {', '.join(POOLS)}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.channel_mult = tuple(channel_mult)
        self.attention_resolutions = tuple(attention_resolutions)
        self.pool = pool
        time_embed_dim = model_channels * 4
        self.time_embed = time_embedding_mlp(model_channels, time_embed_dim)
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
        ch = torso.ch
        self._feature_size = sum(torso.input_block_chans) + ch
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
            self.feature_dim = ch
        elif pool == "attention":
            if num_head_channels == -1:
                raise ConfigError("the attention pool needs num_head_channels (the reference uses 64)")
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // torso.ds, ch, num_head_channels, out_channels),
            )
            self.feature_dim = ch
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels)
            )
            self.feature_dim = 2048
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, out_channels),
            )
            self.feature_dim = 2048
        self.use_fp16 = False
        if use_fp16:
            self.convert_to_fp16()

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the torso (float16 after `convert_to_fp16`)."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> None:
        """Cast the conv weights/biases of input_blocks and middle_block to float16 (the head stays float32)."""
        for part in (self.input_blocks, self.middle_block):
            convert_convs(part, torch.float16)
        self.use_fp16 = True

    def convert_to_fp32(self) -> None:
        """Undo `convert_to_fp16`."""
        for part in (self.input_blocks, self.middle_block):
            convert_convs(part, torch.float32)
        self.use_fp16 = False

    def torso(self, x: torch.Tensor, timesteps) -> torch.Tensor:
        """Pre-head activations: the middle block's feature map (B, C, h, w) in x's dtype, or for the
        spatial pools the concatenated spatial means of every input block and the middle block (B, F)."""
        timesteps = as_timestep_tensor(timesteps, x.shape[0], x.device)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            return torch.cat(means, dim=-1)
        return h.to(x.dtype)

    def _head_features(self, h: torch.Tensor) -> torch.Tensor:
        if self.pool == "attention":
            norm, act, attention_pool = self.out
            return attention_pool.pooled(act(norm(h)))
        return self.out[:-1](h) if self.pool != "adaptive" else self.out[:3](h).flatten(1)

    def _head_project(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool == "attention":
            return self.out[2].project(features)
        if self.pool == "adaptive":
            return self.out[3](features[:, :, None, None]).flatten(1)
        return self.out[-1](features)

    def forward_with_features(self, x: torch.Tensor, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, out_channels), penultimate features (B, feature_dim)) from one pass."""
        features = self._head_features(self.torso(x, timesteps))
        return self._head_project(features), features

    def forward_features(self, x: torch.Tensor, timesteps) -> torch.Tensor:
        """Penultimate features (B, feature_dim): the input of the head's final projection (attention pool:
        the mean token's attention output before `c_proj`; adaptive: GN+SiLU+global mean)."""
        return self._head_features(self.torso(x, timesteps))

    def forward(self, x: torch.Tensor, timesteps) -> torch.Tensor:
        return self.forward_with_features(x, timesteps)[0]
