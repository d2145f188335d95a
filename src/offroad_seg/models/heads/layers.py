"""Building blocks the heads share: channel LayerNorm on (B, C, H, W), conv-norm-GELU, resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW tensor. On a channels-last tensor
    the permutes are views, so it costs no copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_norm_act(c_in: int, c_out: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
        LayerNorm2d(c_out),
        nn.GELU(),
    )


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
