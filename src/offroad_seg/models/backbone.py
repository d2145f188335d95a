"""Frozen DINOv2 and DINOv3 backbones: any official variant of either family, one feature path.

`Backbone(x)` maps normalised images (B, 3, rows, cols) to patch-token features
(B, C, rows/p, cols/p), p the variant's patch (14 for DINOv2, 16 for DINOv3): the tokens after
the final norm (`layers=1`, the official `x_norm_patchtokens`) or the last `layers` blocks, each
normed, concatenated in block order (`layers=4` is the official `get_intermediate_layers(n=4,
norm=True)`, DINOv2's "+ms" protocol). Class and register (storage) tokens are dropped.

The variants (`variants.py`) differ in family, width, depth, MLP and register tokens. The
architecture itself is timm's (its DINOv2 ViTs, its Eva for DINOv3); the forward pass is written
here so that position information follows the official code exactly: DINOv2's position
embeddings resized per variant and added in float32, DINOv3's rotary embeddings (`rope.py`)
with the periods the weights were trained with, applied in float32 to the patch tokens' queries
and keys, and the masked key bias.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from offroad_seg.config import DEFAULT_BACKBONE
from offroad_seg.core.runtime import autocast
from offroad_seg.errors import ConfigError
from offroad_seg.models import lora
from offroad_seg.models.preprocess import Preprocessing, normalize
from offroad_seg.models.rope import rope_periods, rope_sincos, rotate
from offroad_seg.models.variants import (
    DINOV3,
    BackboneVariant,
    PosEmbedResize,
    get_variant,
    variant_for_arch,
)
from offroad_seg.models.weights import (
    RANDOM,
    find_weights,
    load_weights_into,
    read_state_dict,
    state_dict_sha256,
)

log = logging.getLogger(__name__)

_RANDOM_SEED = 0  # `--weights random` must give the same backbone in extract and evaluate


@dataclass(frozen=True)
class BackboneSpec:
    """What a cache or head was made with: enough to rebuild and to check compatibility."""

    weights_sha256: str
    weights_source: str
    layers: int = 1
    name: str = DEFAULT_BACKBONE
    # a block cache (`extract --block K`): the tokens entering block K, before the head's
    # blocks K..N-1 and the final norm; None: the final features
    block: int | None = None

    @property
    def variant(self) -> BackboneVariant:
        return get_variant(self.name)

    @property
    def arch(self) -> str:
        return self.variant.timm_arch

    @property
    def embed_dim(self) -> int:
        return self.variant.embed_dim

    @property
    def channels(self) -> int:
        return self.variant.channels(self.layers)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "arch": self.arch,
            "embed_dim": self.embed_dim,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BackboneSpec:
        name = d.get("name") or variant_for_arch(d.get("arch", "vit_small_patch14_dinov2")).name
        return cls(
            weights_sha256=d["weights_sha256"],
            weights_source=d["weights_source"],
            layers=int(d["layers"]),
            name=name,
            block=None if d.get("block") is None else int(d["block"]),
        )

    def identity(self) -> dict:
        """The fields that decide what the features are (the source path does not). The timm
        architecture names the variant, as it did before the registry: old fingerprints hold
        (the block is named only for block caches)."""
        out = {"arch": self.arch, "weights_sha256": self.weights_sha256, "layers": self.layers}
        return out if self.block is None else {**out, "block": self.block}

    @property
    def stored_channels(self) -> int:
        """Channels a cache stores: the head's input, or one token's width (block caches)."""
        return self.channels if self.block is None else self.embed_dim

    @property
    def stored_layers(self) -> int:
        """Layers a cache's int8 scales cover: the concatenated blocks, or one (block caches)."""
        return self.layers if self.block is None else 1

    def describe(self) -> str:
        block = "" if self.block is None else f", tokens entering block {self.block}"
        return f"{self.name} (layers={self.layers}, {self.channels} channels{block})"


def resize_pos_embed(
    patch_pos: torch.Tensor, rows: int, cols: int, how: PosEmbedResize
) -> torch.Tensor:
    """Resize (1, M*M, C) patch position embeddings to (1, rows*cols, C) exactly as the
    official code does for a variant (see `PosEmbedResize`), in float32; untouched at the
    pretraining grid (M x M)."""
    m = round(patch_pos.shape[1] ** 0.5)
    if m * m != patch_pos.shape[1]:
        raise ValueError(f"position embeddings of {patch_pos.shape[1]} patches are not square")
    if rows == cols == m:
        return patch_pos.float()
    dim = patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if how.offset:
        size = {"scale_factor": ((rows + how.offset) / m, (cols + how.offset) / m)}
    else:
        size = {"size": (rows, cols)}
    grid = F.interpolate(grid, mode="bicubic", antialias=how.antialias, **size)
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"position embedding resize gave {tuple(grid.shape[-2:])}")
    return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)


def create_vit(variant: BackboneVariant, depth: int | None = None) -> nn.Module:
    """timm's architecture of a variant at its pretraining size, without a classifier.
    `depth` truncates it (tests only: the full ViT-g has 1.1 B parameters, the 7B 6.7 B).
    DINOv3: the RoPE periods become part of the weights (`rope.periods`, persistent), as in the
    official files, set to the values the official code computes for the variant."""
    import timm  # 2-3 s of imports (torchvision models) that training on a cache never needs

    extra = {} if depth is None else {"depth": depth}
    vit = timm.create_model(
        variant.timm_arch,
        pretrained=False,
        img_size=variant.pretrain_grid * variant.patch_size,
        num_classes=0,
        dynamic_img_size=True,
        **extra,
    )
    if variant.family == DINOV3:
        periods = rope_periods(variant.head_dim, variant.rope_base, variant.rope_dtype)
        vit.rope.register_buffer("periods", periods, persistent=True)
    return vit


class Tail(nn.Module):
    """Blocks `start`..N-1 and a final norm, run after the blocks before `start`: the part of
    the backbone an ensemble member tuned from a block cache runs with its own weights."""

    def __init__(self, start: int, blocks: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        self.start = start
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm


class Backbone(nn.Module):
    """A frozen variant -> (B, C, rows/p, cols/p) patch-token features (p: its patch).

    With tails (`set_tails`: an ensemble whose members tuned the last blocks) the blocks
    before the tails' start run once and each tail on their output; the features are the
    tails' concatenated on channels, (B, tails * C, rows/p, cols/p), in tail order."""

    def __init__(self, vit: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.spec = spec
        self.variant = spec.variant
        if not 1 <= spec.layers <= len(vit.blocks):
            raise ConfigError(f"layers {spec.layers}: expected 1 to {len(vit.blocks)}")
        self._pos_cache: dict[tuple[int, int, torch.device], tuple[torch.Tensor, ...]] = {}
        self.tails: nn.ModuleList | None = None

    def own_tail(self, start: int) -> Tail:
        """Blocks `start`..N-1 and the final norm of this backbone, as a `Tail` (the modules
        themselves, not copies)."""
        return Tail(start, list(self.vit.blocks)[start:], self.vit.norm)

    def set_tails(self, tails: list[Tail]) -> None:
        """Run the shared blocks once and then each of `tails` (which start at one block);
        their features come out concatenated on channels (see the class docstring)."""
        if not tails or len({t.start for t in tails}) != 1:
            raise ValueError("tails must start at one block")
        self.tails = nn.ModuleList(tails)

    def patch_pos_embed(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """DINOv2: (1, rows*cols, C) float32 position embeddings of the patch tokens."""
        pos = self.vit.pos_embed.detach()
        patch_pos = pos if self.variant.registers else pos[:, 1:]
        return resize_pos_embed(patch_pos, rows, cols, self.variant.pos_resize).to(device)

    def positions(self, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """What tells the tokens of a rows x cols grid where they are (cached per grid):
        DINOv2 `(pos_embed,)`, DINOv3 `(sin, cos)` of the rotary embeddings."""
        key = (rows, cols, device)
        if key not in self._pos_cache:
            if self.variant.family == DINOV3:
                periods = self.vit.rope.periods.detach()
                self._pos_cache[key] = rope_sincos(periods, rows, cols, device)
            else:
                self._pos_cache[key] = (self.patch_pos_embed(rows, cols, device),)
        return self._pos_cache[key]

    def _apply(self, fn, recurse: bool = True):  # moving the module invalidates cached embeddings
        self._pos_cache = {}
        return super()._apply(fn, recurse)

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        """(B, 1 + registers, C) float32: the class token with its position embedding (timm's
        register layout folds it in already), then the register tokens, which have none."""
        vit = self.vit
        cls = vit.cls_token.float()
        if not self.variant.registers:
            cls = cls + vit.pos_embed[:, :1].float()
            return cls.expand(batch, -1, -1)
        return torch.cat([cls, vit.reg_token.float()], dim=1).expand(batch, -1, -1)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """The tokens entering block 0 (B, prefix + rows*cols, C), float32, and the grid."""
        b, _, h, w = x.shape
        p = self.variant.patch_size
        rows, cols = h // p, w // p
        vit = self.vit
        if self.variant.family == DINOV3:
            # the official token order: class, storage, patches; float32 (torch.cat promotes
            # the patch projection, bf16/fp16 under autocast, as the official code's cat does)
            t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2).float()
            return torch.cat([self.prefix_tokens(b), t], dim=1), rows, cols
        # Position embeddings are added in float32, as the official code and timm do (under
        # autocast the patch projection comes out in bf16/fp16)
        t = vit.patch_embed(x).reshape(b, rows * cols, -1).float()
        t = t + self.positions(rows, cols, x.device)[0]
        t = torch.cat([self.prefix_tokens(b), t], dim=1)
        return vit.norm_pre(t), rows, cols

    def run_block(
        self, i: int, t: torch.Tensor, rows: int, cols: int, block: nn.Module | None = None
    ) -> torch.Tensor:
        """Block i (or `block`, a tail's copy of it) on the tokens t of a rows x cols grid
        (DINOv3: with its rotary embeddings)."""
        block = self.vit.blocks[i] if block is None else block
        if self.variant.family == DINOV3:
            return self._rope_block(block, *self.positions(rows, cols, t.device), t)
        return block(t)

    def tokens_entering(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """The full token sequence entering block `block` (class, register/storage, then patch
        tokens; before the final norm): (B, prefix + rows*cols, C) float32 for block 0, the
        output of block `block - 1` otherwise. What a block cache stores."""
        t, rows, cols = self._tokens(x)
        for i in range(block):
            t = self.run_block(i, t, rows, cols)
        return t

    def features_from(
        self,
        t: torch.Tensor,
        start: int,
        rows: int,
        cols: int,
        checkpointing: bool = False,
        tail: Tail | None = None,
    ) -> torch.Tensor:
        """Blocks start..N-1 on the tokens entering block `start`, then the final norm on the
        last `layers` blocks' outputs (prefix tokens dropped): features (B, C, rows, cols).
        `checkpointing`: recompute each block's activations in the backward pass instead of
        keeping them (tuned blocks; only while gradients are recorded). `tail`: its blocks
        and norm instead of the backbone's (it must start at `start`)."""
        depth, prefix = len(self.vit.blocks), self.variant.prefix_tokens
        first_kept = depth - self.spec.layers
        if start > first_kept:
            raise ConfigError(f"block {start} is after the first of the last {self.spec.layers}")
        blocks, norm = list(self.vit.blocks)[start:], self.vit.norm
        if tail is not None:
            if tail.start != start:
                raise ValueError(f"a tail from block {tail.start} run from block {start}")
            blocks, norm = tail.blocks, tail.norm
        outs = []
        for i, block in zip(range(start, depth), blocks, strict=True):
            if checkpointing and torch.is_grad_enabled():
                t = checkpoint(self.run_block, i, t, rows, cols, block, use_reentrant=False)
            else:
                t = self.run_block(i, t, rows, cols, block)
            if i >= first_kept:
                outs.append(norm(t)[:, prefix:])
        feats = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return feats.transpose(1, 2).reshape(t.shape[0], -1, rows, cols)  # symbolic for export

    def tails_features(self, t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Each tail (`set_tails`) on the tokens entering their first block, the features
        concatenated on channels."""
        return torch.cat(
            [self.features_from(t, tail.start, rows, cols, tail=tail) for tail in self.tails],
            dim=1,
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tails is not None:
            p = self.variant.patch_size
            t = self.tokens_entering(x, self.tails[0].start)
            return self.tails_features(t, x.shape[-2] // p, x.shape[-1] // p)
        t, rows, cols = self._tokens(x)
        return self.features_from(t, 0, rows, cols)

    def _rope_block(
        self, block: nn.Module, sin: torch.Tensor, cos: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """One DINOv3 block as the official SelfAttentionBlock computes it at inference:
        t + ls1 * attn(norm1(t)), then t + ls2 * mlp(norm2(t))."""
        t = t + block.gamma_1 * self._rope_attention(block.attn, block.norm1(t), sin, cos)
        return t + block.gamma_2 * block.mlp(block.norm2(t))

    def _rope_attention(
        self, attn: nn.Module, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor
    ) -> torch.Tensor:
        """Self-attention with the masked key bias (zero) and the rotary embeddings applied in
        float32 to the patch tokens' queries and keys (class and storage tokens unrotated)."""
        b, n, c = x.shape
        bias = None
        if attn.q_bias is not None:
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        qkv = lora.linear(attn.qkv, x, bias).reshape(b, n, 3, self.variant.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, heads, N, d) each
        q, k = rotate(q, sin, cos), rotate(k, sin, cos)
        out = F.scaled_dot_product_attention(q, k, v)
        return attn.proj(out.transpose(1, 2).reshape(b, n, c))

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        prep: Preprocessing,
        hflip: bool = False,
        block: int | None = None,
    ) -> torch.Tensor:
        """The one path from resized uint8 images (B, 3, rows, cols), as `resize_image` makes
        them, to float32 features (B, C, h, w), for extract, evaluate and predict.
        `hflip=True` appends the mirrored images' features: (2B, C, h, w). `block`: the
        tokens entering that block instead, as a block cache stores them (`stored_tokens`)."""
        device = self.vit.cls_token.device
        x = normalize(images.to(device, non_blocking=True), prep)
        if hflip:
            x = torch.cat([x, x.flip(-1)])
        with autocast(device):
            if block is not None:
                return stored_tokens(self.tokens_entering(x, block).float())
            return self(x).float()


def stored_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """A token sequence (B, T, C) in a cache's feature layout (B, C, 1, T): one row of T
    "positions", so that chunking, int8 (a scale per token) and the sources work unchanged."""
    return tokens.transpose(1, 2).unsqueeze(2)


def tokens_from_stored(stored: torch.Tensor) -> torch.Tensor:
    """The inverse of `stored_tokens`: (B, C, 1, T) -> (B, T, C)."""
    return stored.flatten(2).transpose(1, 2)


def load_backbone(
    weights: str | None = None,
    layers: int = 1,
    device: str | torch.device = "cpu",
    allow_download: bool = True,
    name: str = DEFAULT_BACKBONE,
) -> Backbone:
    """Build a frozen backbone of variant `name` from resolved weights (see `weights.py` for
    the order); weights of another variant are refused."""
    variant = get_variant(name)
    source = find_weights(weights, variant, allow_download=allow_download)
    if source == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            vit = create_vit(variant)
        log.warning("using an UNTRAINED (random) %s: features carry no pretrained meaning", name)
    else:
        # built on the meta device and filled by the checkpoint: a random initialisation of
        # every parameter (~30 s for ViT-g) that the weights replace anyway is skipped
        with torch.device("meta"):
            vit = create_vit(variant)
        load_weights_into(vit, read_state_dict(Path(source)), source, variant)
        log.info("loaded %s weights from %s", name, source)
    spec = BackboneSpec(
        weights_sha256=state_dict_sha256(vit.state_dict()),
        weights_source=source,
        layers=layers,
        name=name,
    )
    return Backbone(vit, spec).to(device)
