"""DINOv3's axial rotary position embeddings (RoPE), as the official code computes them at
inference.

Each patch token's query and key are rotated by angles that depend on its patch centre: rows
and columns each normalised to [-1, 1] by their own count ("separate"), so every grid, square
or not, spans the same range and nothing is resized. The periods are `base ** (2j / (D/2))` for
j < D/4 (D the head width), computed in the dtype the weights were trained with: the release
files of the distilled ViTs hold them as bfloat16 values, the 7B's as float32 ones; the hub code
loads them into a float32 buffer and computes the angles, sines and cosines in float32. The
training-time coordinate augmentations (shift, jitter, rescale) do not apply at inference.
"""

from __future__ import annotations

import math

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rope_periods(head_dim: int, base: float, dtype: str) -> torch.Tensor:
    """(head_dim / 4,) float32 periods, computed in `dtype` ('bf16' or 'fp32') the way the
    official code initialises them."""
    dt = _DTYPES[dtype]
    exponents = 2 * torch.arange(head_dim // 4, dtype=dt) / (head_dim // 2)
    return (base**exponents).to(dt).float()


def rope_sincos(
    periods: torch.Tensor, rows: int, cols: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos), each (rows*cols, head_dim) float32, for a rows x cols grid in row-major
    token order: the row angles of every frequency, then the column angles, repeated twice
    (the rotate-half layout)."""
    periods = periods.to(device=device, dtype=torch.float32)
    dd = {"device": periods.device, "dtype": torch.float32}
    ys = torch.arange(0.5, rows, **dd) / rows
    xs = torch.arange(0.5, cols, **dd) / cols
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0  # (rows*cols, 2) in [-1, 1]
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the last `sin.shape[-2]` tokens of x (..., N, D) in float32 and return x's dtype;
    the tokens before them (class and register tokens) are left as they are."""
    prefix = x.shape[-2] - sin.shape[-2]
    head, tokens = x[..., :prefix, :], x[..., prefix:, :].float()
    half = tokens.shape[-1] // 2
    turned = torch.cat([-tokens[..., half:], tokens[..., :half]], dim=-1)
    tokens = tokens * cos + turned * sin
    return torch.cat([head, tokens.to(x.dtype)], dim=-2)
