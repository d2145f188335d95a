"""Segmentation heads on the backbone's token grid: (B, C, h, w) -> (B, K, h, w) logits.

`convnext` (default): 1x1 projection to `width`, `depth` ConvNeXt blocks (depthwise 7x7,
LayerNorm, MLP with GELU, layer scale, residual), dropout, 1x1 classifier.
`baseline`: the seed's head, kept to reproduce it: 7x7 conv to 128, GELU, depthwise 7x7, GELU,
1x1, GELU, 1x1 classifier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from offroad_seg.errors import ConfigError

HEADS = ("convnext", "baseline")
_DEFAULT_WIDTH = {"convnext": 96, "baseline": 128}
_DEFAULT_DEPTH = {"convnext": 2, "baseline": 1}
_DEFAULT_DROPOUT = {"convnext": 0.1, "baseline": 0.0}  # the seed's head had no dropout


@dataclass(frozen=True)
class HeadConfig:
    name: str = "convnext"
    in_channels: int = 384
    num_classes: int = 11
    width: int = 0  # 0: the head's default (convnext 96, baseline 128)
    depth: int = 0  # 0: the head's default (convnext 2 blocks, baseline 1)
    dropout: float | None = None  # None: the head's default (convnext 0.1, baseline 0)
    kernel_size: int = 7
    mlp_ratio: int = 4
    layer_scale: float = 1e-6

    def __post_init__(self) -> None:
        if self.name not in HEADS:
            raise ConfigError(f"head {self.name!r}: expected one of {', '.join(HEADS)}")
        if self.width == 0:
            object.__setattr__(self, "width", _DEFAULT_WIDTH[self.name])
        if self.depth == 0:
            object.__setattr__(self, "depth", _DEFAULT_DEPTH[self.name])
        if self.dropout is None:
            object.__setattr__(self, "dropout", _DEFAULT_DROPOUT[self.name])
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel size {self.kernel_size}: must be odd")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout {self.dropout}: must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        return cls(**d)


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


class BaselineHead(nn.Module):
    """The seed's head (stem, `depth` depthwise blocks, classifier)."""

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


def build_head(cfg: HeadConfig) -> nn.Module:
    return {"convnext": ConvNeXtHead, "baseline": BaselineHead}[cfg.name](cfg)


def count_parameters(head: nn.Module) -> int:
    return sum(p.numel() for p in head.parameters())


def flops_per_image(cfg: HeadConfig, grid: tuple[int, int]) -> int:
    """Multiply-accumulates x 2 of one forward pass at a token grid (convs and linears)."""
    from torch.utils.flop_counter import FlopCounterMode

    head = build_head(cfg).eval()
    x = torch.zeros(1, cfg.in_channels, *grid)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(x)
    return int(counter.get_total_flops())
