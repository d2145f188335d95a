"""The pyramid head: a UPerNet/FPN decoder on a ViTDet-style feature pyramid built from the
single-scale tokens, logits at 4x the token grid."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from offroad_seg.models.heads.layers import LayerNorm2d, conv_norm_act, resize_to

if TYPE_CHECKING:  # the package imports this module: a runtime import would be circular
    from offroad_seg.models.heads import HeadConfig


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average-pool to s x s for each scale, 1x1 conv, upsample,
    concatenate with the input, 3x3 conv back to `width`: context from the whole image."""

    def __init__(self, width: int, scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.scales = scales
        self.branches = nn.ModuleList(conv_norm_act(width, width, 1) for _ in scales)
        self.bottleneck = conv_norm_act((1 + len(scales)) * width, width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [
            resize_to(branch(F.adaptive_avg_pool2d(x, s)), x)
            for s, branch in zip(self.scales, self.branches, strict=True)
        ]
        return self.bottleneck(torch.cat([x, *pooled], 1))


class PyramidHead(nn.Module):
    """UPerNet-style decoder on a simple (ViTDet) feature pyramid built from the token grid.

    Levels at x4, x2, x1 and x0.5 the token resolution (two stride-2 transposed convs, one,
    none, a 2x2 max-pool). Level i reads backbone layer `level_layers[i]`: with 4 layers the
    earliest layer feeds the finest level, with 1 every level reads the same tokens. Each
    level is projected to `width` channels at the token resolution before it is resampled
    (ViTDet resamples first, at the embedding width: 4-16x the cost for the same shapes).
    Pyramid pooling (scales 1, 2, 3, 6) on the coarsest level, FPN top-down sums with 3x3
    convs, every level upsampled to x4, concatenated, fused by a 3x3 conv, dropout and a 1x1
    classifier: logits at 4x the token resolution.

    Normalisation is a LayerNorm over channels at each pixel, not BatchNorm: users train with
    batches of 2-16, and BatchNorm's statistics are noisy there and degenerate in the pooling
    branch, where the 1x1 pooled map of a batch of 2 gives each channel 2 values. Per-pixel
    LayerNorm does not depend on the batch or the map size (ViTDet's and ConvNeXt's choice),
    and on the channels-last tensors used here it needs no copies."""

    LEVELS = 4

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        w = cfg.width
        # evenly spaced layers ending at the last: 4 layers -> 0, 1, 2, 3; 1 layer -> 0, 0, 0, 0
        self.level_layers = tuple(
            ((i + 1) * cfg.layers + self.LEVELS - 1) // self.LEVELS - 1 for i in range(self.LEVELS)
        )
        self.layer_channels = cfg.layer_channels
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cfg.layer_channels, w, 1, bias=False), LayerNorm2d(w))
            for _ in range(self.LEVELS)
        )
        self.resample = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(w, w, 2, stride=2),
                    LayerNorm2d(w),
                    nn.GELU(),
                    nn.ConvTranspose2d(w, w, 2, stride=2),
                ),
                nn.ConvTranspose2d(w, w, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, ceil_mode=True),  # ceil: odd grids keep their last row
            ]
        )
        self.ppm = PyramidPooling(w)
        self.fpn = nn.ModuleList(conv_norm_act(w, w, 3) for _ in range(self.LEVELS - 1))
        self.fuse = conv_norm_act(self.LEVELS * w, w, 3)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(w, cfg.num_classes, 1)
        self.to(memory_format=torch.channels_last)  # see LayerNorm2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, K, 4h, 4w)
        layers = x.split(self.layer_channels, dim=1)
        levels = [
            resample(proj(layers[i]))
            for i, proj, resample in zip(self.level_layers, self.proj, self.resample, strict=True)
        ]
        top = self.ppm(levels[-1])
        fused = [top]  # coarse to fine
        for level, conv in zip(reversed(levels[:-1]), reversed(self.fpn), strict=True):
            top = level + resize_to(top, level)
            fused.append(conv(top))
        finest = fused[-1]
        x = torch.cat([finest, *(resize_to(f, finest) for f in reversed(fused[:-1]))], 1)
        return self.classifier(self.dropout(self.fuse(x)))
