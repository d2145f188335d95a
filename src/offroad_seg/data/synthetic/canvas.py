"""The canvas a scene is painted on (`_Scene`: image, class ids, texture) and its noise fields."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Noise fields and helpers


def _value_noise(
    rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int
) -> np.ndarray:
    """Smooth noise of roughly unit variance: a random grid upsampled bicubically to (h, w)."""
    grid = rng.standard_normal((max(2, cells_y), max(2, cells_x)), dtype=np.float32)
    up = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    out = np.asarray(up, dtype=np.float32)
    std = float(out[::5, ::5].std()) or 1.0
    return out / std


@dataclass
class _Scene:
    rng: np.random.Generator
    h: int
    w: int
    cls: np.ndarray  # (H, W) uint8 class index
    rgb: np.ndarray  # (3, H, W) float32 colour before lighting (planar: fast broadcasting)
    hor: np.ndarray  # (W,) horizon row per column
    ground_bottom: float  # the highest row the hood/band reaches; objects stand above it
    mid: np.ndarray
    small: np.ndarray
    fine: np.ndarray
    streak: np.ndarray
    sun: float  # horizontal light direction, -1 (from the left) .. 1 (from the right)
    shadow_dx: float  # shadows fall this way (in object widths)
    shadow_k: float  # shadow darkening factor
    haze_rgb: np.ndarray
    haze_max: float
    haze_len: float  # pixels below the horizon over which haze fades

    def g_at(self, x: float, y: float) -> float:
        """Pixels between the horizon and ground point (x, y): the perspective size scale."""
        xi = min(self.w - 1, max(0, int(x)))
        return float(y - self.hor[xi])

    def haze(self, g: float) -> float:
        return self.haze_max * float(np.exp(-max(g, 0.0) / self.haze_len))

    def tint(self, color: np.ndarray, g: float, jitter: float = 0.07) -> np.ndarray:
        """A jittered copy of `color`, faded by haze for an object `g` pixels below the horizon."""
        c = color * (1.0 + self.rng.uniform(-jitter, jitter, 3).astype(np.float32))
        f = self.haze(g)
        return (c * (1.0 - f) + self.haze_rgb * f).astype(np.float32)

    def window(
        self, x0: float, x1: float, y0: float, y1: float
    ) -> tuple[int, int, int, int, np.ndarray, np.ndarray] | None:
        """Integer box clipped to the frame with its pixel-centre coordinates, or None if empty."""
        ix0 = max(0, int(np.floor(x0)))
        ix1 = min(self.w, int(np.ceil(x1)) + 1)
        iy0 = max(0, int(np.floor(y0)))
        iy1 = min(self.h, int(np.ceil(y1)) + 1)
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        ys = np.arange(iy0, iy1, dtype=np.float32)[:, None]
        xs = np.arange(ix0, ix1, dtype=np.float32)[None, :]
        return iy0, iy1, ix0, ix1, ys, xs

    def paint(
        self, box: tuple[int, int, int, int], mask: np.ndarray, k: int, color: np.ndarray
    ) -> None:
        """Set class `k` and `color` ((3,) or (3, h, w)) where `mask` is true inside `box`."""
        y0, y1, x0, x1 = box
        if color.ndim == 1:
            color = color[:, None, None]
        np.copyto(self.cls[y0:y1, x0:x1], np.uint8(k), where=mask)
        np.copyto(self.rgb[:, y0:y1, x0:x1], color, where=mask[None])

    def shadow(self, cx: float, cy: float, rx: float, ry: float) -> None:
        """Darken an elliptic patch of whatever lies there (shadows change no class)."""
        rx, ry = max(rx, 0.8), max(ry, 0.6)
        win = self.window(cx - rx, cx + rx, cy - ry, cy + ry)
        if win is None:
            return
        y0, y1, x0, x1, ys, xs = win
        r = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2
        soft = np.clip((1.0 - r) * 3.0, 0.0, 1.0)
        dark = 1.0 - (1.0 - self.shadow_k) * soft
        self.rgb[:, y0:y1, x0:x1] *= dark[None]


def _blob_union(
    ys: np.ndarray,
    xs: np.ndarray,
    centers: np.ndarray,
    radii: np.ndarray,
) -> np.ndarray:
    """max over ellipses of (1 - r^2): positive inside the union of the ellipses."""
    v = None
    for (cx, cy), (rx, ry) in zip(centers, radii, strict=True):
        vi = 1.0 - ((xs - cx) / rx) ** 2 - ((ys - cy) / ry) ** 2
        v = vi if v is None else np.maximum(v, vi)
    assert v is not None
    return v
