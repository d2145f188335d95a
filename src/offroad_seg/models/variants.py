"""The registry of DINOv2 backbones: the eight official variants and what differs between them.

Each entry holds what the official hub code (facebookresearch/dinov2, `hub/backbones.py`) builds
differently: width, depth, heads, the MLP (ViT-g uses SwiGLU), the number of register tokens,
and how position embeddings are resized to another token grid (the plain variants: bicubic with
scale factors (n + 0.1) / 37, no antialiasing; the register variants: bicubic to the exact size,
antialiased), and where the weights live (the official release file, timm's and transformers'
Hugging Face repositories). This module is plain data: it imports no torch, so the CLI can offer
the names without loading a framework.
"""

from __future__ import annotations

from dataclasses import dataclass

from offroad_seg.errors import ConfigError

PATCH_SIZE = 14
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class PosEmbedResize:
    """How the official code resizes a variant's position embeddings to another grid.

    `offset > 0`: `F.interpolate(scale_factor=((rows + offset) / M, (cols + offset) / M))`, the
    original DINOv2 kludge against floating-point error; `offset == 0`: by output size. Both
    bicubic in float32; `antialias` as the variant was built with."""

    offset: float
    antialias: bool


PLAIN_RESIZE = PosEmbedResize(offset=0.1, antialias=False)
REGISTER_RESIZE = PosEmbedResize(offset=0.0, antialias=True)


@dataclass(frozen=True)
class BackboneVariant:
    """One official DINOv2 variant: architecture, token layout and where its weights live."""

    name: str  # the torch hub entry point, e.g. "dinov2_vitb14_reg"
    timm_arch: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str  # "mlp" (GELU) or "swiglu"
    registers: int
    pos_resize: PosEmbedResize
    official_file: str  # facebookresearch/dinov2's release file name
    timm_repo: str  # Hugging Face repository in timm's layout
    transformers_repo: str  # Hugging Face repository in transformers' layout
    params_m: float  # parameters in millions, without registers (for the docs; tested)
    patch_size: int = PATCH_SIZE
    pretrain_grid: int = 37  # 518 / 14: the grid the position embeddings were trained at

    @property
    def prefix_tokens(self) -> int:
        """Class token plus register tokens: what precedes the patch tokens."""
        return 1 + self.registers

    @property
    def official_url(self) -> str:
        folder = self.name.removesuffix("_reg")
        return f"{OFFICIAL_URL}/{folder}/{self.official_file}"

    def channels(self, layers: int) -> int:
        return self.embed_dim * layers


def _variant(
    size: str, width: int, depth: int, heads: int, params: float, reg: bool
) -> BackboneVariant:
    arch = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    suffix = "_reg" if reg else ""
    return BackboneVariant(
        name=f"dinov2_vit{size}14{suffix}",
        timm_arch=f"vit_{arch}_patch14_{'reg4_' if reg else ''}dinov2",
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        ffn="swiglu" if size == "g" else "mlp",
        registers=4 if reg else 0,
        pos_resize=REGISTER_RESIZE if reg else PLAIN_RESIZE,
        official_file=f"dinov2_vit{size}14{'_reg4' if reg else ''}_pretrain.pth",
        timm_repo=f"timm/vit_{arch}_patch14_{'reg4_' if reg else ''}dinov2.lvd142m",
        transformers_repo=f"facebook/dinov2-{'with-registers-' if reg else ''}{arch}",
        params_m=params,
    )


BACKBONES: dict[str, BackboneVariant] = {
    v.name: v
    for reg in (False, True)
    for v in (
        _variant("s", 384, 12, 6, 22.06, reg),
        _variant("b", 768, 12, 12, 86.58, reg),
        _variant("l", 1024, 24, 16, 304.37, reg),
        _variant("g", 1536, 40, 24, 1136.48, reg),
    )
}


def get_variant(name: str) -> BackboneVariant:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"backbone {name!r}: expected one of {', '.join(BACKBONES)}") from None


def variant_for_arch(arch: str) -> BackboneVariant:
    """The variant of a timm architecture name (caches written before the registry existed
    record only that)."""
    for variant in BACKBONES.values():
        if variant.timm_arch == arch:
            return variant
    raise ConfigError(f"backbone architecture {arch!r} is not a DINOv2 variant this tool knows")
