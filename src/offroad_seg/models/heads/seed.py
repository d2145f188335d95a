"""The hackathon seed's head, kept to reproduce it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the package imports this module: a runtime import would be circular
    from offroad_seg.models.heads import HeadConfig


class SeedHead(nn.Module):
    """The hackathon seed's head, kept to reproduce it: conv (7x7) to `width` (128), GELU,
    `depth` (1) blocks of depthwise conv, GELU, 1x1 conv, GELU; 1x1 classifier. Module names
    are those of the former `BaselineHead`, so its checkpoints load unchanged."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        k, w = cfg.kernel_size, cfg.width
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, w, k, padding=k // 2), nn.GELU())
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(w, w, k, padding=k // 2, groups=w),
                    nn.GELU(),
                    nn.Conv2d(w, w, 1),
                    nn.GELU(),
                )
                for _ in range(cfg.depth)
            )
        )
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(w, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.blocks(self.stem(x))))


BaselineHead = SeedHead  # the former name
