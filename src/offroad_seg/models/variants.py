"""The registry of backbones: two families, DINOv2 (eight official variants) and DINOv3 (six
ViTs), and what differs between them.

Each entry holds what the official hub code (facebookresearch/dinov2 or dinov3,
`hub/backbones.py`) builds differently: the family, the patch size, width, depth, heads, the MLP
(SwiGLU for ViT-g, S+/16, H+/16 and 7B/16), the register tokens, and where the weights live (the
official release file, timm's and transformers' Hugging Face repositories).

The families differ in how tokens learn where they are. DINOv2 (patch 14) adds a position
embedding table, resized to another token grid as each variant was built (the plain variants:
bicubic with scale factors (n + 0.1) / 37, no antialiasing; the register variants: bicubic to
the exact size, antialiased). DINOv3 (patch 16) has no table: axial rotary embeddings (RoPE) of
patch-centre coordinates normalised per axis to [-1, 1], so any grid needs no resize; its
periods are those the weights were trained with (`rope_dtype`). This module is plain data: it
imports no torch, so the CLI can offer the names without loading a framework.
"""

from __future__ import annotations

from dataclasses import dataclass

from offroad_seg.errors import ConfigError

DINOV2, DINOV3 = "dinov2", "dinov3"
FAMILIES = (DINOV2, DINOV3)
DINOV2_PATCH = 14  # also the patch of caches and heads written before DINOv3 (they record none)
OFFICIAL_URL = {
    DINOV2: "https://dl.fbaipublicfiles.com/dinov2",
    DINOV3: "https://dl.fbaipublicfiles.com/dinov3",
}

# The default working size of each family: the dataset's 960x540 halved (480x270), rounded to
# the patch. DINOv2: floored to 14, 266x476 (the seed's size, a 19x34 grid); DINOv3: to the
# nearest multiple of 16, 272x480 (a 17x30 grid; 3% more pixels, aspect 0.567 against the
# images' 0.5625; flooring would give 256x480, 3% fewer pixels but the aspect further off).
DEFAULT_SIZES = {DINOV2: (266, 476), DINOV3: (272, 480)}


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
    """One official variant: architecture, token layout and where its weights live."""

    name: str  # the torch hub entry point, e.g. "dinov2_vitb14_reg", "dinov3_vits16"
    timm_arch: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str  # "mlp" (GELU) or "swiglu"
    registers: int
    pos_resize: PosEmbedResize | None  # DINOv2; None for DINOv3 (RoPE needs no resize)
    official_file: str  # the official release file name
    timm_repo: str  # Hugging Face repository in timm's layout
    transformers_repo: str  # Hugging Face repository in transformers' layout
    params_m: float  # parameters in millions, without registers (for the docs; tested)
    patch_size: int = DINOV2_PATCH
    pretrain_grid: int = 37  # 518 / 14: the grid the position embeddings were trained at
    family: str = DINOV2
    # DINOv3: the dtype the official code computed the RoPE periods in when the weights were
    # trained ("bf16": ssl_default_config and the distilled ViT-L config; "fp32": the 7B's
    # configs); the release files hold the periods so computed (timm: "downcast to bfloat16")
    rope_dtype: str = ""
    rope_base: float = 100.0
    qkv_bias: bool = True  # DINOv3 7B/16 has none; the others' key bias is masked to zero
    timm_alt_repos: tuple[str, ...] = ()  # more timm repositories of the same weights
    ade20k_linear: float | None = None  # published ADE20K linear-probe mIoU (docs)

    @property
    def default_size(self) -> tuple[int, int]:
        return DEFAULT_SIZES[self.family]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def hf_repos(self) -> tuple[str, ...]:
        """Hugging Face repositories of the weights, in resolution order."""
        return (self.timm_repo, *self.timm_alt_repos, self.transformers_repo)

    @property
    def prefix_tokens(self) -> int:
        """Class token plus register tokens: what precedes the patch tokens."""
        return 1 + self.registers

    @property
    def official_url(self) -> str:
        folder = self.name.removesuffix("_reg")
        return f"{OFFICIAL_URL[self.family]}/{folder}/{self.official_file}"

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


def _dinov3(
    size: str, width: int, depth: int, heads: int, ffn: str, file_hash: str, params: float, **extra
) -> BackboneVariant:
    """A DINOv3 ViT as facebookresearch/dinov3's hub/backbones.py builds it: patch 16, 4
    storage (register) tokens, LayerNorm eps 1e-5, LayerScale, RoPE base 100 on per-axis
    normalised coordinates, masked key bias, LVD-1689M weights."""
    arch = {
        "s": "small",
        "splus": "small_plus",
        "b": "base",
        "l": "large",
        "hplus": "huge_plus",
        "7b": "7b",
    }[size]
    compact = size.replace("plus", "16plus") if "plus" in size else f"{size}16"
    qkvb = "" if size == "7b" else "_qkvb"  # timm's faithful variants keep the q/v biases
    return BackboneVariant(
        name=f"dinov3_vit{compact}",
        timm_arch=f"vit_{arch}_patch16_dinov3{qkvb}",
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        ffn=ffn,
        registers=4,
        pos_resize=None,
        official_file=f"dinov3_vit{compact}_pretrain_lvd1689m-{file_hash}.pth",
        timm_repo=f"timm/vit_{arch}_patch16_dinov3{qkvb}.lvd1689m",
        timm_alt_repos=(f"timm/vit_{arch}_patch16_dinov3.lvd1689m",) if qkvb else (),
        transformers_repo=f"facebook/dinov3-vit{compact}-pretrain-lvd1689m",
        params_m=params,
        patch_size=16,
        pretrain_grid=14,  # 224 / 16, the hub's img_size; RoPE makes it irrelevant
        family=DINOV3,
        rope_dtype="fp32" if size == "7b" else "bf16",
        qkv_bias=size != "7b",
        **extra,
    )


# ADE20K linear probing (mIoU), from the DINOv3 model card (facebookresearch/dinov3
# MODEL_CARD.md, "Results", dense tasks of the LVD-1689M ViTs)
BACKBONES: dict[str, BackboneVariant] = {
    v.name: v
    for v in (
        *(
            _variant(size, width, depth, heads, params, reg)
            for reg in (False, True)
            for size, width, depth, heads, params in (
                ("s", 384, 12, 6, 22.06),
                ("b", 768, 12, 12, 86.58),
                ("l", 1024, 24, 16, 304.37),
                ("g", 1536, 40, 24, 1136.48),
            )
        ),
        _dinov3("s", 384, 12, 6, "mlp", "08c60483", 21.60, ade20k_linear=47.0),
        _dinov3("splus", 384, 12, 6, "swiglu", "4057cbaa", 28.69, ade20k_linear=48.8),
        _dinov3("b", 768, 12, 12, "mlp", "73cec8be", 85.66, ade20k_linear=51.8),
        _dinov3("l", 1024, 24, 16, "mlp", "8aa4cbdd", 303.13, ade20k_linear=54.9),
        _dinov3("hplus", 1280, 32, 20, "swiglu", "7c1da9a5", 840.59, ade20k_linear=54.8),
        _dinov3("7b", 4096, 40, 32, "swiglu", "a955f4ea", 6716.03, ade20k_linear=55.9),
    )
}

# Weights whose preprocessing differs from the tool's (ImageNet mean and std): refused by name
SATELLITE_TAG = "sat493m"


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
    raise ConfigError(f"backbone architecture {arch!r} is not a variant this tool knows")
