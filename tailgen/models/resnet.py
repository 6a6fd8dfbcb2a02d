"""A small pre-activation ResNet classifier for 28x28 / 32x32 grey images: the evaluation-only *judge*.

tailgen's domain features come from an ADM ``EncoderUNetModel`` (GroupNorm, attention pooling, SiLU). A claim
about sample quality should not hinge on one network's feature space, so a second, independently trained
extractor of a different family is shipped for evaluation only: a pre-activation ResNet (He et al., "Identity
Mappings in Deep Residual Networks", ECCV 2016) with BatchNorm + ReLU, global average pooling and a linear head,

    h_0 = Conv3x3(x);   h_{k+1} = h_k' + F(h_k),  F = Conv3x3(ReLU(BN(Conv3x3(ReLU(BN(h_k))))))
    (h_k' = h_k, or a strided 1x1 conv when the width or resolution changes)
    features = AvgPool(ReLU(BN(h_L)))  (``widths[-1]``-d);   logits = Linear(features).

Call signature as the ADM classifiers: ``net(x, timesteps=None) -> logits`` and
``forward_features(x, timesteps=None)`` (timesteps are accepted and ignored: the judge is a clean classifier),
so :class:`tailgen.metrics.features.ClassifierFeatures` and the trainers use it unchanged. ``x`` in [-1, 1].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tailgen.utils import ConfigError


class _PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.skip = None if (c_in == c_out and stride == 1) else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(x))
        skip = x if self.skip is None else self.skip(h)
        h = self.conv2(self.act(self.bn2(self.conv1(h))))
        return skip + h


class ResNetClassifier(nn.Module):
    """Pre-activation ResNet; stage k has ``blocks[k]`` blocks of width ``widths[k]`` (stride 2 from stage 2).

    Args:
        in_channels: image channels (1 for Fashion-MNIST).
        num_classes: classes of the linear head.
        widths: channel width per stage.
        blocks: residual blocks per stage (same length as ``widths``).
        dropout: dropout before the head (training only).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128),
                 blocks: Sequence[int] = (2, 2, 2), dropout: float = 0.0, image_size: int | None = None):
        super().__init__()
        widths, blocks = [int(w) for w in widths], [int(b) for b in blocks]
        if not widths or len(widths) != len(blocks) or min(widths) < 1 or min(blocks) < 1:
            raise ConfigError(f"resnet widths {widths} and blocks {blocks} must be non-empty positive lists of "
                              "equal length")
        self.image_size = image_size  # informational (the network is resolution-agnostic)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, c = [], widths[0]
        for k, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(_PreActBlock(c, w, 2 if (k > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*layers)
        self.norm, self.act = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c, num_classes)

    def forward_features(self, x: torch.Tensor, timesteps=None) -> torch.Tensor:
        """Pooled penultimate features (B, widths[-1]) (``timesteps`` ignored: a clean classifier)."""
        h = self.act(self.norm(self.blocks(self.stem(x))))
        return h.mean(dim=(2, 3)).float()

    def forward_with_features(self, x: torch.Tensor, timesteps=None) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.forward_features(x)
        return self.head(self.dropout(feats).to(self.head.weight.dtype)), feats

    def forward(self, x: torch.Tensor, timesteps=None) -> torch.Tensor:
        return self.forward_with_features(x)[0]


def create_resnet_classifier(**flags) -> ResNetClassifier:
    """Builder from YAML / JSON flags (lists may arrive as comma strings: ``"32,64,128"``)."""
    flags = dict(flags)
    for key in ("widths", "blocks"):
        if isinstance(flags.get(key), str):
            flags[key] = [int(v) for v in flags[key].split(",") if v.strip()]
    return ResNetClassifier(**flags)


__all__ = ["ResNetClassifier", "create_resnet_classifier"]
