"""Bilinear upsampling of token logits to pixels, as matrix products (align_corners=False,
exactly as `F.interpolate`): the inference path (predictions and their cross-entropy in strips)
and the fused training loss share these matrices."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch

from offroad_seg.data.classes import IGNORE_ID


@functools.lru_cache(maxsize=32)
def _bilinear_matrix_cpu(src: int, dst: int) -> torch.Tensor:
    # source coordinate of each destination pixel centre, as F.interpolate(align_corners=False)
    x = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).clamp_min(0)
    x0 = x.floor().long().clamp_max(src - 1)
    x1 = (x0 + 1).clamp_max(src - 1)
    frac = x - x0
    m = torch.zeros(dst, src, dtype=torch.float64)
    rows = torch.arange(dst)
    m.index_put_((rows, x0), 1 - frac, accumulate=True)
    m.index_put_((rows, x1), frac, accumulate=True)
    return m.float()


@functools.lru_cache(maxsize=64)
def bilinear_matrix(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """(dst, src) matrix R with R @ v = bilinear resize of v (align_corners=False), built once
    per device: copying it from the host every step would be a host sync per step on CUDA."""
    return _bilinear_matrix_cpu(src, dst).to(device)


def upsample_bilinear(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, H, W), equal to F.interpolate(bilinear, align_corners=False) to
    float rounding, as two matrix products (several times faster on CPU)."""
    (h, w), (height, width) = logits.shape[-2:], size
    ry = bilinear_matrix(h, height, logits.device)
    rx_t = bilinear_matrix(w, width, logits.device).t()
    return torch.matmul(ry, torch.matmul(logits.float(), rx_t))


def upsample_mean(logits: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """The mean of several (B, K, h_i, w_i) logits, each upsampled (bilinear) to `size`: how
    multi-scale test-time augmentation combines its passes."""
    return sum(upsample_bilinear(part, size) for part in logits) / len(logits)


def _upsampled_strips(
    parts: list[torch.Tensor], size: tuple[int, int], rows: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, (B, K, rows, W) logits) strip by strip: every part upsampled to `size`
    (along the columns once, then strip by strip along the rows) and averaged."""
    height, width = size
    device = parts[0].device
    cols = [torch.matmul(p.float(), bilinear_matrix(p.shape[-1], width, device).t()) for p in parts]
    row_maps = [bilinear_matrix(p.shape[-2], height, device) for p in parts]
    for r0 in range(0, height, rows):
        z = torch.matmul(row_maps[0][r0 : r0 + rows], cols[0])  # (B, K, rows, W)
        for ry, a in zip(row_maps[1:], cols[1:], strict=True):
            z += torch.matmul(ry[r0 : r0 + rows], a)
        if len(parts) > 1:
            z /= len(parts)
        yield r0, z


@torch.no_grad()
def predict_and_score(
    logits: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | None,
    size: tuple[int, int],
    rows: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Upsample token logits to `size`; return the per-pixel argmax (B, H, W) and, with
    labels, the unweighted cross-entropy sum and the count of non-ignored pixels.

    Full-size logits are 11 x 540 x 960 floats (23 MB) per image, so they are produced and
    consumed in strips of `rows` rows that stay in cache: several times faster on CPU than
    materialising them, and less memory on GPU. A list of logits (test-time augmentation's
    passes, each on its own grid) is averaged after upsampling, strip by strip."""
    parts = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    height, width = size
    device = parts[0].device
    pred = torch.empty((parts[0].shape[0], height, width), dtype=torch.long, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for r0, z in _upsampled_strips(parts, size, rows):
        peak, pred[:, r0 : r0 + rows] = z.max(1)  # first maximum, like argmax (~6x faster)
        if labels is not None:
            lab = labels[:, r0 : r0 + rows].long()
            valid = lab != IGNORE_ID
            z_target = z.gather(1, lab.masked_fill(~valid, 0)[:, None])[:, 0]
            lse = z.sub_(peak[:, None]).exp_().sum(1).log_().add_(peak)
            loss += ((lse - z_target) * valid).sum(dtype=torch.float64)
    if labels is None:
        return pred, None, None
    return pred, loss, (labels != IGNORE_ID).sum()


@torch.no_grad()
def predict_with_probs(
    logits: torch.Tensor | Sequence[torch.Tensor], size: tuple[int, int], rows: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pixel argmax (B, H, W), as `predict_and_score`'s, and the class probabilities
    (B, K, H, W) float16: the softmax of the same upsampled logits, strip by strip."""
    parts = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    (height, width), (batch, k) = size, parts[0].shape[:2]
    device = parts[0].device
    pred = torch.empty((batch, height, width), dtype=torch.long, device=device)
    probs = torch.empty((batch, k, height, width), dtype=torch.float16, device=device)
    for r0, z in _upsampled_strips(parts, size, rows):
        pred[:, r0 : r0 + rows] = z.max(1).indices
        probs[:, :, r0 : r0 + rows] = z.softmax(1)
    return pred, probs
