"""The convnext head: a 1x1 projection and ConvNeXt blocks at the token resolution."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the package imports this module: a runtime import would be circular
    from offroad_seg.models.heads import HeadConfig


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> LayerNorm -> MLP (GELU) -> layer scale -> residual, on NHWC tensors.

    The depthwise conv sees an NHWC tensor through a permuted (channels-last) view: oneDNN's
    channels-last depthwise kernels are ~3x faster than NCHW ones on CPU, and LayerNorm and
    the MLP want channels last anyway, so the head never copies between layouts."""

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, w, C)
        y = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        return x + self.gamma * y


class ConvNeXtHead(nn.Module):
    """1x1 projection to `width`, LayerNorm, `depth` ConvNeXt blocks, dropout, 1x1
    classifier, at the token resolution."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.in_channels, cfg.width)  # a 1x1 conv, on NHWC
        self.norm = nn.LayerNorm(cfg.width)
        self.blocks = nn.Sequential(
            *(
                ConvNeXtBlock(cfg.width, cfg.kernel_size, cfg.mlp_ratio, cfg.layer_scale)
                for _ in range(cfg.depth)
            )
        )
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Linear(cfg.width, cfg.num_classes)
        # channels-last weights for the depthwise convs (see ConvNeXtBlock)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, K, h, w)
        x = self.blocks(self.norm(self.proj(x.permute(0, 2, 3, 1))))
        x = self.dropout(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # whole channels, per image
        return self.classifier(x).permute(0, 3, 1, 2)
