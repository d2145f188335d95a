"""An independent reference for DINOv2 features, for tests.

It computes what the official facebookresearch/dinov2 code computes (`DinoVisionTransformer.
get_intermediate_layers(x, n, norm=True)` and `forward_features(x)["x_norm_patchtokens"]`),
written from the official semantics with plain tensor operations, straight from a state dict in
the OFFICIAL layout: `pos_embed` with the class token's position, `register_tokens`, `mask_token`,
SwiGLU as `mlp.w12` / `mlp.w3`. It shares no code with offroad_seg or timm: attention is an
explicit softmax, layer norms and the MLPs are written out.

Official semantics reproduced here:
- tokens = [cls, patches] + interpolated position embeddings; register tokens (no position
  embedding) are inserted after the class token;
- position embeddings are resized bicubically in float32 from the 37x37 pretraining grid:
  plain variants with scale factors ((rows + 0.1) / 37, (cols + 0.1) / 37) and no antialias,
  register variants to the exact size with antialias; untouched when the grid is 37x37;
- block: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)); layer norms eps 1e-6;
- outputs: each requested block's tokens through the final norm, class and register tokens
  dropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6


def _layer_norm(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _linear(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return x @ sd[prefix + ".weight"].t() + sd[prefix + ".bias"]


def _pos_embed(pos: torch.Tensor, rows: int, cols: int, registers: int) -> torch.Tensor:
    m = int(math.sqrt(pos.shape[1] - 1))
    if rows == cols == m:
        return pos
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    if registers:  # interpolate_antialias=True, interpolate_offset=0.0: by size
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True)
    else:  # interpolate_antialias=False, interpolate_offset=0.1: by scale factor
        scale = ((rows + 0.1) / m, (cols + 0.1) / m)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (rows, cols)
    patch = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat([pos[:, :1], patch], dim=1)


def _attention(x: torch.Tensor, sd: dict, prefix: str, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    qkv = _linear(x, sd, prefix + ".qkv").reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, N, d) each
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return _linear(out, sd, prefix + ".proj")


def _mlp(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    if prefix + ".w12.weight" in sd:  # SwiGLU (ViT-g): silu(x1) * x2, then w3
        x1, x2 = _linear(x, sd, prefix + ".w12").chunk(2, dim=-1)
        return _linear(F.silu(x1) * x2, sd, prefix + ".w3")
    return _linear(F.gelu(_linear(x, sd, prefix + ".fc1")), sd, prefix + ".fc2")


@torch.no_grad()
def official_intermediate_layers(
    sd: dict[str, torch.Tensor], x: torch.Tensor, n: int, num_heads: int
) -> list[torch.Tensor]:
    """The official `get_intermediate_layers(x, n, norm=True)`: the last `n` blocks' patch
    tokens (B, rows*cols, C), each through the final norm, in block order."""
    sd = {k: v.float() for k, v in sd.items()}
    b, _, h, w = x.shape
    rows, cols = h // 14, w // 14
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    tokens = torch.cat([sd["cls_token"].expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    tokens = tokens + _pos_embed(sd["pos_embed"], rows, cols, registers)
    if registers:
        regs = sd["register_tokens"].expand(b, -1, -1)
        tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    outputs = []
    for i in range(depth):
        p = f"blocks.{i}"
        attn = _attention(_layer_norm(tokens, sd, p + ".norm1"), sd, p + ".attn", num_heads)
        tokens = tokens + sd[p + ".ls1.gamma"] * attn
        mlp = _mlp(_layer_norm(tokens, sd, p + ".norm2"), sd, p + ".mlp")
        tokens = tokens + sd[p + ".ls2.gamma"] * mlp
        if i >= depth - n:
            outputs.append(_layer_norm(tokens, sd, "norm")[:, 1 + registers :])
    return outputs


def official_features(
    sd: dict[str, torch.Tensor], x: torch.Tensor, layers: int, num_heads: int
) -> torch.Tensor:
    """What offroad-seg caches: (B, layers * C, rows, cols), the layers concatenated along
    channels in block order (layers=1: the official `x_norm_patchtokens`)."""
    b, _, h, w = x.shape
    outs = official_intermediate_layers(sd, x, layers, num_heads)
    return torch.cat(outs, dim=-1).transpose(1, 2).reshape(b, -1, h // 14, w // 14)
