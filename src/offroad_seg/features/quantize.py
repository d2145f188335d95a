"""int8 feature storage: symmetric quantisation with one scale per token and layer.

A cached feature map (..., C, h, w) of `layers` concatenated backbone layers is stored as int8
values and float32 scales (..., layers, h, w): for every token and every layer, the channels are
divided by their largest magnitude / 127 and rounded. Per-token scales follow the backbone's
token norms, which vary a lot between tokens (DINOv2 without registers has high-norm artifact
tokens) and between the layers of a `--layers 4` stack; per-channel scales would let one such
token spoil a whole channel. `bench/bench_cache.py` measures the error against float16.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize_int8(features: torch.Tensor, layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C, h, w) floats -> (int8 values of the same shape, float32 scales
    (..., layers, h, w)); `dequantize` inverts it to within half a step per value."""
    *lead, c, h, w = features.shape
    if c % layers:
        raise ValueError(f"{c} channels do not split into {layers} layers")
    x = features.float().reshape(*lead, layers, c // layers, h, w)
    scale = x.abs().amax(dim=-3) / QMAX  # (..., layers, h, w)
    q = torch.round(x / scale.clamp_min(1e-30).unsqueeze(-3)).clamp_(-QMAX, QMAX)
    return q.to(torch.int8).reshape(features.shape), scale


def dequantize(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Stored features -> float32: int8 values times their token scales, or float values as
    they are (`scales` None)."""
    if scales is None:
        return values.float()
    *lead, c, h, w = values.shape
    layers = scales.shape[-3]
    x = values.float().reshape(*lead, layers, c // layers, h, w)
    return (x * scales.float().unsqueeze(-3)).reshape(*lead, c, h, w)
