"""An independent reference for DINOv3 features, for tests.

It computes what the official facebookresearch/dinov3 code computes (`DinoVisionTransformer.
get_intermediate_layers(x, n=n, norm=True)`; n=1 gives `forward_features(x)
["x_norm_patchtokens"]`), written from the official semantics with plain tensor operations,
straight from a state dict in the OFFICIAL layout: `storage_tokens`, `mask_token`, the fused
`attn.qkv.bias` with its `bias_mask`, `ls1.gamma`, SwiGLU as `mlp.w1` / `w2` / `w3`, and
`rope_embed.periods`. It shares no code with offroad_seg or timm: attention is an explicit
softmax, layer norms, the MLPs and the rotary embeddings are written out.

Official semantics reproduced here (eval mode, the hub's settings):
- tokens = [cls, 4 storage tokens, patches], no position embedding table;
- RoPE (`RopePositionEmbedding`, normalize_coords="separate", dtype float32 in the hub): patch
  centres (i + 0.5) / H and (j + 0.5) / W mapped to [-1, 1], angles 2 pi coord / period for
  each of the D/4 periods, per axis (rows then columns), tiled twice; the periods are the
  state dict's own (`rope_embed.periods`: the official loader copies them in); no shift,
  jitter or rescale (training-time augmentations);
- attention: qkv = x W^T + bias * bias_mask (the key third of the mask is zero), q and k of the
  patch tokens rotated as x cos + rotate_half(x) sin in float32 (rotate_half: [-x2, x1]),
  prefix tokens untouched, softmax(q k^T / sqrt(d)) v;
- block: x + ls1 * attn(norm1(x)), then x + ls2 * ffn(norm2(x)); LayerNorm eps 1e-5
  ("layernormbf16"); ffn GELU MLP, or SwiGLU w3(silu(w1 x) * w2 x);
- outputs: each requested block's tokens through the final norm (not cls_norm or
  local_cls_norm: the released ViTs tie the class and patch norms), class and storage tokens
  dropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-5
PATCH = 16


def official_rope_periods(head_dim: int, dtype: torch.dtype, base: float = 100.0) -> torch.Tensor:
    """`RopePositionEmbedding._init_weights` with `base`: base ** (2 j / (D/2)), j < D/4,
    computed in `dtype` (what training stored in the checkpoint)."""
    j = torch.arange(head_dim // 4, dtype=dtype)
    return base ** (2 * j / (head_dim // 2))


def _layer_norm(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _linear(x: torch.Tensor, sd: dict, prefix: str, bias_mask: bool = False) -> torch.Tensor:
    out = x @ sd[prefix + ".weight"].t()
    if prefix + ".bias" in sd:
        bias = sd[prefix + ".bias"]
        if bias_mask:
            bias = bias * sd[prefix + ".bias_mask"]
        out = out + bias
    return out


def _sin_cos(periods: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows*cols, D) sines and cosines in row-major patch order."""
    y = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows * 2 - 1
    x = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols * 2 - 1
    yy = y[:, None].expand(rows, cols).reshape(-1)
    xx = x[None, :].expand(rows, cols).reshape(-1)
    p = periods.float()
    angles = torch.cat([2 * math.pi * yy[:, None] / p, 2 * math.pi * xx[:, None] / p], dim=1)
    angles = torch.cat([angles, angles], dim=1)
    return torch.sin(angles), torch.cos(angles)


def _rope(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing patch tokens of (B, heads, N, d)."""
    n_patch = sin.shape[0]
    prefix, patches = t[:, :, :-n_patch], t[:, :, -n_patch:]
    d = patches.shape[-1] // 2
    half_turn = torch.cat([-patches[..., d:], patches[..., :d]], dim=-1)
    return torch.cat([prefix, patches * cos + half_turn * sin], dim=2)


def _attention(x, sd, prefix, heads, sin, cos):
    b, n, c = x.shape
    qkv = _linear(x, sd, prefix + ".qkv", bias_mask=prefix + ".qkv.bias_mask" in sd)
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k = _rope(q, sin, cos), _rope(k, sin, cos)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return _linear(out, sd, prefix + ".proj")


def _ffn(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    if prefix + ".w1.weight" in sd:  # SwiGLUFFN
        hidden = F.silu(_linear(x, sd, prefix + ".w1")) * _linear(x, sd, prefix + ".w2")
        return _linear(hidden, sd, prefix + ".w3")
    return _linear(F.gelu(_linear(x, sd, prefix + ".fc1")), sd, prefix + ".fc2")


@torch.no_grad()
def official_intermediate_layers(
    sd: dict[str, torch.Tensor], x: torch.Tensor, n: int, num_heads: int
) -> list[torch.Tensor]:
    """The official `get_intermediate_layers(x, n=n, norm=True)`: the last `n` blocks' patch
    tokens (B, rows*cols, C), each through the final norm, in block order."""
    sd = {k: v.float() for k, v in sd.items()}
    b, _, h, w = x.shape
    rows, cols = h // PATCH, w // PATCH
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    storage = sd["storage_tokens"]
    tokens = torch.cat(
        [
            sd["cls_token"].expand(b, -1, -1),
            storage.expand(b, -1, -1),
            patches.flatten(2).transpose(1, 2),
        ],
        dim=1,
    )
    sin, cos = _sin_cos(sd["rope_embed.periods"], rows, cols)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    outputs = []
    for i in range(depth):
        p = f"blocks.{i}"
        attn = _attention(
            _layer_norm(tokens, sd, p + ".norm1"), sd, p + ".attn", num_heads, sin, cos
        )
        tokens = tokens + sd[p + ".ls1.gamma"] * attn
        ffn = _ffn(_layer_norm(tokens, sd, p + ".norm2"), sd, p + ".mlp")
        tokens = tokens + sd[p + ".ls2.gamma"] * ffn
        if i >= depth - n:
            outputs.append(_layer_norm(tokens, sd, "norm")[:, 1 + storage.shape[1] :])
    return outputs


def official_features(
    sd: dict[str, torch.Tensor], x: torch.Tensor, layers: int, num_heads: int
) -> torch.Tensor:
    """What offroad-seg caches: (B, layers * C, rows, cols), the layers concatenated along
    channels in block order (layers=1: the official `x_norm_patchtokens`)."""
    b, _, h, w = x.shape
    outs = official_intermediate_layers(sd, x, layers, num_heads)
    return torch.cat(outs, dim=-1).transpose(1, 2).reshape(b, -1, h // PATCH, w // PATCH)
