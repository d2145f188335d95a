"""The linear head: DINOv2's linear segmentation protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the package imports this module: a runtime import would be circular
    from offroad_seg.models.heads import HeadConfig


class LinearHead(nn.Module):
    """DINOv2's linear segmentation protocol (their "BNHead"): BatchNorm over the input
    channels, dropout, 1x1 conv to the classes. With the last four layers concatenated
    (layers=4) it is the head of the paper's "+ms" setting (which also evaluates at a larger
    resolution with multi-scale test-time augmentation). It has no width or depth.

    BatchNorm is safe here at small batches: its statistics pool every token of the batch
    (B x h x w values per channel, ~1300 at batch 2 and a 19x34 grid)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cfg.in_channels)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(cfg.in_channels, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(x)))
