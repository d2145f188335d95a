"""Segmentation heads: backbone token features (B, C, h, w) -> class logits (B, K, h*s, w*s).

Every head is ONE entry of `HEADS` (a `HeadSpec`: name, module class, default width, depth and
dropout, output scale s, a one-line description, old names). `HeadConfig` validation and
default resolution, `build_head`, the names a CLI offers (`head_choices`) and its help text
(`head_defaults_help`) all read the registry, so a new head is a module class plus one entry,
and the tests parametrised over the registry cover it.

The loss and evaluation upsample logits bilinearly from whatever size a head outputs to the
label size, so a head may output logits finer than the token grid (s > 1).

`C = layers x embed`: the backbone's last `layers` blocks concatenated along channels, earliest
first (`HeadConfig.layers`; 1 for the final-norm tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from offroad_seg.config import TrainConfig, default
from offroad_seg.errors import ConfigError

# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class HeadConfig:
    """What a head is: enough to rebuild it (checkpoints store `to_dict()`). Zero width or
    depth and dropout None mean the head's registry default; they are resolved on creation."""

    # a registry name or alias (`head_choices()`), stored canonical; the default head is
    # TrainConfig's, the one place it is set
    name: str = default(TrainConfig, "head")
    in_channels: int = 384
    layers: int = 1  # backbone layers concatenated in in_channels (old checkpoints: 1)
    num_classes: int = 11
    width: int = 0  # 0: the head's default (see HEADS); heads without a width keep 0
    depth: int = 0  # 0: the head's default; heads without a depth keep 0
    dropout: float | None = None  # None: the head's default
    kernel_size: int = 7  # seed and convnext
    mlp_ratio: int = 4  # convnext
    layer_scale: float = 1e-6  # convnext

    def __post_init__(self) -> None:
        spec = get_head_spec(self.name)
        object.__setattr__(self, "name", spec.name)
        for field in ("in_channels", "layers", "num_classes"):
            if getattr(self, field) < 1:
                raise ConfigError(f"head {field} {getattr(self, field)}: must be at least 1")
        if self.in_channels % self.layers:
            raise ConfigError(
                f"head in_channels {self.in_channels}: not divisible by layers {self.layers}"
            )
        for field in ("width", "depth"):
            value, registry_default = getattr(self, field), getattr(spec, field)
            if value < 0:
                raise ConfigError(f"head {field} {value}: must be positive (0: the default)")
            if not spec.has(field) and value != 0:
                raise ConfigError(f"head {spec.name} has no {field} setting (got {value})")
            if value == 0:
                object.__setattr__(self, field, registry_default)
        if self.dropout is None:
            object.__setattr__(self, "dropout", spec.dropout)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"head dropout {self.dropout}: must be in [0, 1)")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"head kernel size {self.kernel_size}: must be odd and positive")
        if self.mlp_ratio < 1:
            raise ConfigError(f"head mlp ratio {self.mlp_ratio}: must be at least 1")

    @property
    def spec(self) -> HeadSpec:
        return HEADS[self.name]

    @property
    def layer_channels(self) -> int:
        """Channels of one backbone layer (the embedding width)."""
        return self.in_channels // self.layers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> HeadConfig:
        """Tolerates dicts of older versions: missing settings take their defaults, old head
        names their canonical name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"head config: unknown setting(s) {', '.join(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- heads


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


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class HeadSpec:
    """One registered head. A width or depth default of 0: the head has no such setting."""

    name: str
    module: type[nn.Module]  # built as module(cfg: HeadConfig)
    width: int
    depth: int
    dropout: float
    output_scale: int  # logits are (h * output_scale, w * output_scale) for an h x w grid
    description: str
    aliases: tuple[str, ...] = ()  # former names, accepted and stored as `name`

    def has(self, setting: str) -> bool:
        """Whether the head has `width`, `depth` or `dropout` (every head has a dropout)."""
        return setting == "dropout" or getattr(self, setting) != 0


HEADS: Mapping[str, HeadSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            HeadSpec(
                "linear", LinearHead, width=0, depth=0, dropout=0.0, output_scale=1,
                description="DINOv2's linear protocol: BatchNorm + 1x1 conv (no width/depth)",
            ),
            HeadSpec(
                "seed", SeedHead, width=128, depth=1, dropout=0.0, output_scale=1,
                description="the hackathon seed's conv head (7x7 conv, depthwise blocks)",
                aliases=("baseline",),
            ),
            HeadSpec(
                "convnext", ConvNeXtHead, width=96, depth=2, dropout=0.1, output_scale=1,
                description="1x1 projection + ConvNeXt blocks at the token resolution",
            ),
            HeadSpec(
                "pyramid", PyramidHead, width=96, depth=0, dropout=0.1, output_scale=4,
                description="UPerNet/FPN decoder on a ViTDet feature pyramid, logits at x4",
            ),
        )
    }
)  # fmt: skip
_ALIASES: Mapping[str, str] = MappingProxyType(
    {alias: spec.name for spec in HEADS.values() for alias in spec.aliases}
)


def head_names() -> tuple[str, ...]:
    """Registered head names, in registry order (without aliases)."""
    return tuple(HEADS)


def head_choices() -> tuple[str, ...]:
    """Every name a user may give: the registered names, then the aliases."""
    return (*HEADS, *_ALIASES)


def get_head_spec(name: str) -> HeadSpec:
    """The registry entry of a head name or alias."""
    spec = HEADS.get(_ALIASES.get(name, name))
    if spec is None:
        raise ConfigError(f"head {name!r}: expected one of {', '.join(head_names())}")
    return spec


def head_defaults_help(field: str) -> str:
    """Each head's default of `width`, `depth` or `dropout` for help text, e.g.
    "seed 128, convnext 96, pyramid 96" (heads without the setting are left out)."""
    return ", ".join(f"{s.name} {getattr(s, field):g}" for s in HEADS.values() if s.has(field))


def build_head(cfg: HeadConfig) -> nn.Module:
    return cfg.spec.module(cfg)


def count_parameters(head: nn.Module) -> int:
    return sum(p.numel() for p in head.parameters())


def flops_per_image(cfg: HeadConfig, grid: tuple[int, int]) -> int:
    """Multiply-accumulates x 2 of one forward pass at a token grid (convs, transposed convs
    and linears; norms, pooling and resizing are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    head = build_head(cfg).eval()
    x = torch.zeros(1, cfg.in_channels, *grid)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(x)
    return int(counter.get_total_flops())
