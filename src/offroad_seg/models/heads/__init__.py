"""Segmentation heads: backbone token features (B, C, h, w) -> class logits (B, K, h*s, w*s).

Every head is a module of this package (linear, seed, convnext, pyramid, upnext; shared blocks
in `layers`) and ONE entry of `HEADS` (a `HeadSpec`: name, module class, the settings it reads,
default width, depth and dropout, output scale s, a one-line description, old names).
`HeadConfig` validation and default resolution, `build_head`, the names a CLI offers
(`head_choices`), its help text (`head_defaults_help`) and the settings `info` and `compare`
show all read the registry, so a new head is a module class plus one entry, and the tests
parametrised over the registry cover it.

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
from torch import nn

from offroad_seg.config import TrainConfig, default
from offroad_seg.core.text import word
from offroad_seg.errors import ConfigError
from offroad_seg.models.heads.convnext import ConvNeXtHead
from offroad_seg.models.heads.linear import LinearHead
from offroad_seg.models.heads.pyramid import PyramidHead
from offroad_seg.models.heads.seed import SeedHead
from offroad_seg.models.heads.upnext import UpNextHead

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

    def settings(self) -> dict[str, int | float]:
        """The settings this head reads, resolved (`HeadSpec.settings`, in that order): what
        `info` and `compare` show of a head (a linear head has no width or kernel size)."""
        return {name: getattr(self, name) for name in self.spec.settings}

    @classmethod
    def from_dict(cls, d: Mapping) -> HeadConfig:
        """Tolerates dicts of older versions: missing settings take their defaults, old head
        names their canonical name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            noun = word(len(unknown), "setting")
            raise ConfigError(f"head config: unknown {noun} {', '.join(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- registry


# The HeadConfig fields a head may read besides in_channels, layers and num_classes.
TUNABLE = ("width", "depth", "dropout", "kernel_size", "mlp_ratio", "layer_scale")


@dataclass(frozen=True)
class HeadSpec:
    """One registered head. `settings`: the HeadConfig fields of `TUNABLE` its module reads
    (the one record of which head has which); width and depth default to 0 exactly when the
    head has no such setting."""

    name: str
    module: type[nn.Module]  # built as module(cfg: HeadConfig)
    settings: tuple[str, ...]
    width: int
    depth: int
    dropout: float
    output_scale: int  # logits are (h * output_scale, w * output_scale) for an h x w grid
    description: str
    aliases: tuple[str, ...] = ()  # former names, accepted and stored as `name`

    def __post_init__(self) -> None:
        unknown = set(self.settings) - set(TUNABLE)
        zero = [f for f in ("width", "depth") if (f in self.settings) != (getattr(self, f) != 0)]
        if unknown or zero:
            raise ValueError(f"head {self.name}: settings {self.settings} and defaults disagree")

    def has(self, setting: str) -> bool:
        """Whether the head reads `setting` (a HeadConfig field of `TUNABLE`)."""
        return setting in self.settings


HEADS: Mapping[str, HeadSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            HeadSpec(
                "linear", LinearHead, ("dropout",), width=0, depth=0, dropout=0.0, output_scale=1,
                description="DINOv2's linear protocol: BatchNorm + 1x1 conv (no width/depth)",
            ),
            HeadSpec(
                "seed", SeedHead, ("width", "depth", "dropout", "kernel_size"),
                width=128, depth=1, dropout=0.0, output_scale=1,
                description="the hackathon seed's conv head (7x7 conv, depthwise blocks)",
                aliases=("baseline",),
            ),
            HeadSpec(
                "convnext", ConvNeXtHead, TUNABLE, width=96, depth=2, dropout=0.1, output_scale=1,
                description="1x1 projection + ConvNeXt blocks at the token resolution",
            ),
            HeadSpec(
                "pyramid", PyramidHead, ("width", "dropout"),
                width=96, depth=0, dropout=0.1, output_scale=4,
                description="UPerNet/FPN decoder on a ViTDet feature pyramid, logits at x4",
            ),
            HeadSpec(
                "upnext", UpNextHead, TUNABLE, width=96, depth=2, dropout=0.1, output_scale=4,
                description="convnext blocks + image context + learned x4 upsampler",
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
