"""Procedural off-road desert driving frames in the real dataset's format.

Each scene is a camera view over desert ground: a sky gradient with clouds above a sloped, wavy
horizon, hazy hills, sandy ground (Landscape) with dry-grass patches and sometimes a dirt track,
and objects standing on the ground in perspective (smaller near the horizon): trees, lush and dry
bushes, rocks, logs, ground clutter and flower clusters, with shadows. The bottom of the frame
holds a vehicle hood or a dark unlabelled band (Background). Colours of several classes overlap
on purpose (dry grass vs ground, dry bushes vs logs, tree canopies vs lush bushes, ...) and every
class carries its own texture, so a model needs texture and shape, not colour alone.

Every class of `ClassMap.default()` appears in every scene (at least `min_class_pixels` pixels),
and the mask is exact: a pixel painted with a class's colour carries that class's raw code.
Everything is deterministic by seed (`np.random.default_rng`, no global state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from offroad_seg.data.dataset import IMAGES_DIR, MASKS_DIR, ClassMap, write_mask
from offroad_seg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "MIN_HEIGHT",
    "MIN_WIDTH",
    "SynthConfig",
    "min_class_pixels",
    "render_scene",
    "split_names",
    "synthesize",
    "write_split",
]

MIN_WIDTH = 64
MIN_HEIGHT = 48

# Internal class indices (the order of ClassMap.default()); codes come from the class map.
_BG, _TREE, _LUSH, _GRASS, _DRYBUSH, _CLUTTER, _FLOWER, _LOG, _ROCK, _LAND, _SKY = range(11)
_NAMES = (
    "Background",
    "Trees",
    "Lush Bushes",
    "Dry Grass",
    "Dry Bushes",
    "Ground Clutter",
    "Flowers",
    "Logs",
    "Rocks",
    "Landscape",
    "Sky",
)
_CODE_BY_NAME = {c.name: c.code for c in ClassMap.default().classes}
_CODES = np.array([_CODE_BY_NAME[n] for n in _NAMES], dtype=np.uint16)

# Real file names look like cc0000012.png, mt0000000.png, ww10000000.png.
_PREFIXES = (("cc", 7, 0), ("mt", 7, 0), ("ww", 8, 10_000_000))
_NAME_STREAM = 0x6E616D65  # separates the name generator's stream from the scenes'

# Per-class texture weights for the (mid, small, fine, streak) noise fields, as a relative
# brightness modulation applied to everything painted with that class.
_TEXTURE = np.array(
    [
        [0.02, 0.03, 0.02, 0.00],  # Background
        [0.10, 0.22, 0.10, 0.06],  # Trees
        [0.08, 0.20, 0.09, 0.00],  # Lush Bushes
        [0.06, 0.08, 0.09, 0.26],  # Dry Grass
        [0.06, 0.18, 0.16, 0.08],  # Dry Bushes
        [0.04, 0.10, 0.12, 0.00],  # Ground Clutter
        [0.02, 0.05, 0.07, 0.00],  # Flowers
        [0.04, 0.08, 0.07, 0.00],  # Logs
        [0.07, 0.12, 0.09, 0.00],  # Rocks
        [0.09, 0.07, 0.10, 0.02],  # Landscape
        [0.00, 0.00, 0.012, 0.00],  # Sky
    ],
    dtype=np.float32,
)

# Scene palettes (RGB, before lighting); one entry per class group is drawn per scene and
# jittered, so the ranges of ground, grass, dry bushes, logs and rocks overlap across scenes.
_LAND_COLORS = np.array(
    [[192, 160, 122], [176, 136, 100], [165, 148, 124], [198, 172, 138], [158, 124, 94]],
    np.float32,
)
_GRASS_COLORS = np.array(
    [[204, 178, 122], [186, 160, 106], [176, 150, 104], [196, 170, 130], [168, 146, 96]],
    np.float32,
)
_CANOPY_COLORS = np.array([[84, 100, 58], [58, 82, 46], [100, 108, 78], [72, 92, 52]], np.float32)
_TRUNK_COLORS = np.array([[98, 80, 62], [110, 92, 74], [84, 68, 54]], np.float32)
_LUSH_COLORS = np.array([[78, 118, 50], [92, 126, 62], [66, 104, 56], [104, 130, 64]], np.float32)
_DRYBUSH_COLORS = np.array(
    [[126, 100, 70], [140, 120, 92], [112, 92, 70], [132, 108, 80]], np.float32
)
_LOG_COLORS = np.array([[120, 90, 62], [140, 124, 104], [106, 78, 54], [128, 104, 80]], np.float32)
_ROCK_COLORS = np.array(
    [[132, 122, 110], [116, 108, 100], [146, 130, 110], [104, 96, 88], [150, 140, 128]],
    np.float32,
)
_CLUTTER_COLORS = np.array(
    [[82, 64, 46], [122, 116, 108], [150, 126, 96], [64, 58, 52], [110, 86, 60]], np.float32
)
_FLOWER_COLORS = np.array(
    [[236, 202, 42], [238, 236, 222], [162, 92, 204], [242, 142, 42], [232, 110, 160]],
    np.float32,
)
_FLOWER_LEAF = np.array([96, 120, 70], np.float32)


@dataclass(frozen=True)
class SynthConfig:
    """What `synthesize` writes: `out/train` and `out/val` with `train` and `val` scenes."""

    out: Path
    train: int = 24
    val: int = 8
    seed: int = 0
    width: int = 960
    height: int = 540

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.seed < 0:
            raise ConfigError(f"synthetic data: seed {self.seed} is negative")
        if self.train < 1 or self.val < 1:
            raise ConfigError(
                f"synthetic data: train={self.train} and val={self.val} must both be at least 1"
            )
        _check_size(self.width, self.height)


def min_class_pixels(width: int, height: int) -> int:
    """The fewest pixels every class gets in a scene of this size (400 at 960x540)."""
    return max(6, round(400 * width * height / (960 * 540)))


def _check_size(width: int, height: int) -> None:
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ConfigError(
            f"synthetic data: size {width}x{height} is too small; at least {MIN_WIDTH}x{MIN_HEIGHT}"
        )


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Objects standing on the ground (painted far to near)


def _tree(sc: _Scene, bx: float, by: float, mult: float = 1.0) -> None:
    rng = sc.rng
    g = max(sc.g_at(bx, by), 1.0)
    th = max(4.0, g * rng.uniform(1.1, 2.2) * mult)
    tw = max(1.0, th * rng.uniform(0.045, 0.08))
    lean = rng.uniform(-0.12, 0.12)
    ccx = bx + lean * th * 0.7
    ccy = by - th * rng.uniform(0.68, 0.8)
    crx = th * rng.uniform(0.32, 0.55)
    cry = th * rng.uniform(0.22, 0.34)
    sc.shadow(bx + sc.shadow_dx * crx * 0.8, by + 0.02 * th, crx * 1.1, max(1.0, th * 0.05))

    # Trunk and a few branches.
    win = sc.window(bx - tw - abs(lean) * th - 2, bx + tw + abs(lean) * th + 2, by - th, by)
    if win is not None:
        y0, y1, x0, x1, ys, xs = win
        t = (by - ys) / th
        xc = bx + lean * (by - ys)
        half = tw * 0.5 * (1.0 - 0.4 * t) + tw * 0.5 * np.clip(0.1 - t, 0, None) * 6
        dx = xs - xc
        mask = (np.abs(dx) <= np.maximum(half, 0.5)) & (t >= 0) & (t <= 0.8)
        for _ in range(rng.integers(2, 4)):
            ta = rng.uniform(0.35, 0.6)
            px0, py0 = bx + lean * th * ta, by - th * ta
            px1 = ccx + rng.uniform(-0.8, 0.8) * crx
            py1 = ccy + rng.uniform(-0.3, 0.3) * cry
            mask |= _capsule(ys, xs, px0, py0, px1, py1, max(0.5, tw * 0.22))[0]
        col = sc.tint(_TRUNK_COLORS[rng.integers(len(_TRUNK_COLORS))], g)
        shade = 1.0 + 0.25 * sc.sun * np.clip(dx / np.maximum(half, 0.5), -1, 1)
        sc.paint((y0, y1, x0, x1), mask, _TREE, col[:, None, None] * shade[None])

    # Canopy: a union of ellipses with ragged edges and see-through holes.
    n = int(rng.integers(5, 10))
    centers = np.stack(
        [ccx + rng.uniform(-0.6, 0.6, n) * crx, ccy + rng.uniform(-0.45, 0.45, n) * cry], 1
    )
    radii = np.stack([crx * rng.uniform(0.35, 0.6, n), cry * rng.uniform(0.4, 0.7, n)], 1)
    win = sc.window(ccx - 1.7 * crx, ccx + 1.7 * crx, ccy - 1.5 * cry, ccy + 1.5 * cry)
    if win is None:
        return
    y0, y1, x0, x1, ys, xs = win
    v = _blob_union(ys, xs, centers, radii)
    small = sc.small[y0:y1, x0:x1]
    mask = (v + 0.22 * small + 0.12 * sc.mid[y0:y1, x0:x1] > 0) & (small < 1.5)
    col = sc.tint(_CANOPY_COLORS[rng.integers(len(_CANOPY_COLORS))], g)
    shade = (
        0.9
        - 0.22 * (ys - ccy) / cry
        + 0.15 * sc.sun * (xs - ccx) / crx
        + 0.12 * np.clip(v, -1, 1)
        + 0.12 * small
    )
    sc.paint((y0, y1, x0, x1), mask, _TREE, col[:, None, None] * shade[None])


def _capsule(
    ys: np.ndarray, xs: np.ndarray, x0: float, y0: float, x1: float, y1: float, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the thick segment, signed distance across it in units of radius)."""
    dx, dy = x1 - x0, y1 - y0
    length = max(float(np.hypot(dx, dy)), 1e-6)
    ux, uy = dx / length, dy / length
    u = (xs - x0) * ux + (ys - y0) * uy
    v = (xs - x0) * -uy + (ys - y0) * ux
    uc = np.clip(u, 0.0, length)
    dist2 = (u - uc) ** 2 + v**2
    return dist2 <= radius**2, v / radius


def _bush(sc: _Scene, bx: float, by: float, lush: bool, mult: float = 1.0) -> None:
    rng = sc.rng
    g = max(sc.g_at(bx, by), 1.0)
    bh = max(2.5, g * (rng.uniform(0.3, 0.65) if lush else rng.uniform(0.22, 0.55)) * mult)
    bw = bh * rng.uniform(1.2, 2.2)
    n = int(rng.integers(3, 7))
    cx = bx + rng.uniform(-0.3, 0.3, n) * bw
    cy = by - bh * rng.uniform(0.3, 0.55, n)
    radii = np.stack([bw * rng.uniform(0.22, 0.38, n), bh * rng.uniform(0.35, 0.55, n)], 1)
    sc.shadow(bx + sc.shadow_dx * bw * 0.35, by + 0.03 * bh, bw * 0.6, max(0.8, bh * 0.12))
    win = sc.window(bx - bw, bx + bw, by - 1.4 * bh, by + 1)
    if win is None:
        return
    y0, y1, x0, x1, ys, xs = win
    v = _blob_union(ys, xs, np.stack([cx, cy], 1), radii)
    small = sc.small[y0:y1, x0:x1]
    fine = sc.fine[y0:y1, x0:x1]
    if lush:
        mask = (v + 0.2 * small > 0) & (ys <= by + 0.5)
        palette, k = _LUSH_COLORS, _LUSH
    else:
        # Twiggy and see-through: ragged edges and holes showing what is behind.
        mask = (v + 0.3 * small + 0.12 * fine > 0) & (small < 1.0) & (ys <= by + 0.5)
        palette, k = _DRYBUSH_COLORS, _DRYBUSH
    col = sc.tint(palette[rng.integers(len(palette))], g)
    top = float(cy.min() - radii[:, 1].max())
    shade = 0.75 + 0.3 * (by - ys) / max(by - top, 1.0) + 0.1 * sc.sun * (xs - bx) / bw
    shade = shade + 0.1 * np.clip(v, -1, 1)
    sc.paint((y0, y1, x0, x1), mask, k, col[:, None, None] * shade[None])


def _rock(sc: _Scene, bx: float, by: float, mult: float = 1.0) -> None:
    rng = sc.rng
    g = max(sc.g_at(bx, by), 1.0)
    rx = max(1.6, g * rng.uniform(0.1, 0.3) * mult)
    ry = max(1.2, rx * rng.uniform(0.45, 0.8))
    cx, cy = bx, by - ry * 0.55
    sc.shadow(bx + sc.shadow_dx * rx * 0.6, by, rx * 1.1, max(0.7, ry * 0.3))
    win = sc.window(cx - 1.3 * rx, cx + 1.3 * rx, cy - 1.3 * ry, by + 0.5)
    if win is None:
        return
    y0, y1, x0, x1, ys, xs = win
    nx = (xs - cx) / rx
    ny = (ys - cy) / ry
    r2 = nx**2 + ny**2
    small = sc.small[y0:y1, x0:x1]
    mask = (r2 < 1.0 + 0.18 * sc.mid[y0:y1, x0:x1] + 0.1 * small) & (ys <= by + 0.5)
    nz = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    lx, ly, lz = 0.6 * sc.sun, -0.6, 0.55
    norm = float(np.sqrt(lx * lx + ly * ly + lz * lz))
    lam = np.clip((nx * lx + ny * ly + nz * lz) / norm, 0.0, 1.0)
    shade = 0.5 + 0.65 * lam + 0.06 * small
    col = sc.tint(_ROCK_COLORS[rng.integers(len(_ROCK_COLORS))], g, jitter=0.1)
    sc.paint((y0, y1, x0, x1), mask, _ROCK, col[:, None, None] * shade[None])


def _log(sc: _Scene, bx: float, by: float, mult: float = 1.0) -> None:
    rng = sc.rng
    g = max(sc.g_at(bx, by), 1.0)
    length = max(5.0, g * rng.uniform(0.6, 1.4) * mult)
    rad = max(0.9, length * rng.uniform(0.035, 0.065))
    ang = rng.uniform(-0.45, 0.45) + (np.pi if rng.random() < 0.5 else 0.0)
    dx, dy = 0.5 * length * np.cos(ang), 0.5 * length * np.sin(ang) * 0.5
    cy = by - rad
    x0, y0, x1, y1 = bx - dx, cy - dy, bx + dx, cy + dy
    sc.shadow(bx + sc.shadow_dx * rad, by + 0.5 * rad, abs(dx) + rad, max(0.7, rad * 0.7))
    win = sc.window(
        min(x0, x1) - rad - 1, max(x0, x1) + rad + 1, min(y0, y1) - rad - 1, max(y0, y1) + rad + 1
    )
    if win is None:
        return
    wy0, wy1, wx0, wx1, ys, xs = win
    mask, vn = _capsule(ys, xs, x0, y0, x1, y1, rad)
    if np.cos(ang) < 0:
        vn = -vn
    small = sc.small[wy0:wy1, wx0:wx1]
    vn = np.clip(vn, -1.0, 1.0)
    bark = 1.0 + 0.12 * np.sin(vn * 7.0 + 2.5 * small)
    shade = (0.55 + 0.5 * np.sqrt(1.0 - vn**2) - 0.15 * vn) * bark
    col = sc.tint(_LOG_COLORS[rng.integers(len(_LOG_COLORS))], g, jitter=0.1)
    sc.paint((wy0, wy1, wx0, wx1), mask, _LOG, col[:, None, None] * shade[None])


def _splat(
    sc: _Scene,
    cx: np.ndarray,
    cy: np.ndarray,
    rx: np.ndarray,
    ry: np.ndarray,
    ang: np.ndarray,
    colors: np.ndarray,
    k: int,
) -> None:
    """Paint many small rotated ellipses at once (vectorized); each covers its centre pixel."""
    if cx.size == 0:
        return
    big = np.maximum(rx, ry)
    if cx.size > 8 and float(big.max()) > 3.0:
        # Bin by size so small pieces do not pay for the largest one's window.
        order = np.argsort(big, kind="stable")
        for part in np.array_split(order, 4):
            if part.size:
                _splat_one(sc, cx[part], cy[part], rx[part], ry[part], ang[part], colors[part], k)
        return
    _splat_one(sc, cx, cy, rx, ry, ang, colors, k)


def _splat_one(
    sc: _Scene,
    cx: np.ndarray,
    cy: np.ndarray,
    rx: np.ndarray,
    ry: np.ndarray,
    ang: np.ndarray,
    colors: np.ndarray,
    k: int,
) -> None:
    reach = int(np.ceil(float(np.maximum(rx, ry).max()))) + 1
    off = np.arange(-reach, reach + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    oy, ox = oy.ravel(), ox.ravel()
    icx, icy = np.round(cx).astype(np.int64), np.round(cy).astype(np.int64)
    py = icy[:, None] + oy[None, :]
    px = icx[:, None] + ox[None, :]
    ddx = px - cx[:, None]
    ddy = py - cy[:, None]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    u = (ddx * c + ddy * s) / rx[:, None]
    v = (-ddx * s + ddy * c) / ry[:, None]
    inside = (u * u + v * v <= 1.0) | ((oy == 0) & (ox == 0))[None, :]
    inside &= (py >= 0) & (py < sc.h) & (px >= 0) & (px < sc.w)
    shade = np.clip(1.0 - 0.25 * ddy / ry[:, None], 0.6, 1.3)
    cols = colors[:, None, :] * shade[..., None]
    sc.cls[py[inside], px[inside]] = k
    sc.rgb[:, py[inside], px[inside]] = cols[inside].T


def _ground_points(sc: _Scene, n: int, t_lo: float, t_hi: float, power: float) -> np.ndarray:
    """(n, 2) ground points (x, y); t in [t_lo, t_hi] is the fraction of the way from the
    horizon down to the free ground bottom, drawn as u**power (power > 1: more far away)."""
    rng = sc.rng
    x = rng.uniform(0, sc.w, n)
    hor = sc.hor[np.clip(x.astype(np.int64), 0, sc.w - 1)]
    t = t_lo + (t_hi - t_lo) * rng.random(n) ** power
    y = hor + t * (sc.ground_bottom - hor)
    return np.stack([x, y], 1)


def _clutter(sc: _Scene, pts: np.ndarray, mult: float = 1.0) -> None:
    rng = sc.rng
    n = len(pts)
    if n == 0:
        return
    g = np.maximum(pts[:, 1] - sc.hor[np.clip(pts[:, 0].astype(np.int64), 0, sc.w - 1)], 1.0)
    size = np.maximum(0.6, g * rng.uniform(0.012, 0.035, n) * mult)
    aspect = np.where(rng.random(n) < 0.4, rng.uniform(2.5, 5.0, n), rng.uniform(1.0, 1.8, n))
    rx = np.maximum(0.6, size * np.sqrt(aspect))
    ry = np.maximum(0.5, size / np.sqrt(aspect))
    ang = rng.uniform(-np.pi, np.pi, n)
    base = _CLUTTER_COLORS[rng.integers(len(_CLUTTER_COLORS), size=n)]
    base = base * (1.0 + rng.uniform(-0.1, 0.1, (n, 1)).astype(np.float32))
    f = sc.haze_max * np.exp(-g / sc.haze_len)[:, None]
    cols = (base * (1 - f) + sc.haze_rgb * f).astype(np.float32)
    _splat(sc, pts[:, 0], pts[:, 1] - ry * 0.5, rx, ry, ang, cols, _CLUTTER)


def _flowers(sc: _Scene, bx: float, by: float, mult: float = 1.0) -> None:
    rng = sc.rng
    g = max(sc.g_at(bx, by), 1.0)
    spread = max(2.0, g * rng.uniform(0.12, 0.3) * mult)
    f = sc.haze(g)
    # Low leaves first (green-grey, part of the flowering plant), then the bright blossoms.
    nl = int(rng.integers(4, 9))
    lx = bx + rng.normal(0, 0.45, nl) * spread
    ly = by + rng.normal(0, 0.12, nl) * spread
    lr = np.maximum(0.7, g * rng.uniform(0.02, 0.04, nl) * mult)
    leaf = _FLOWER_LEAF * (1 + rng.uniform(-0.1, 0.1, (nl, 1)).astype(np.float32))
    leaf = leaf * (1 - f) + sc.haze_rgb * f
    _splat(sc, lx, ly, lr * 1.6, lr * 0.8, rng.uniform(-0.5, 0.5, nl), leaf, _FLOWER)
    n = int(rng.integers(15, 45))
    px = bx + rng.normal(0, 0.4, n) * spread
    py = by - rng.uniform(0.0, 0.15, n) * spread + rng.normal(0, 0.1, n) * spread
    r = np.maximum(0.6, g * rng.uniform(0.012, 0.024, n) * mult)
    base = _FLOWER_COLORS[rng.integers(len(_FLOWER_COLORS))]
    cols = base * (1 + rng.uniform(-0.08, 0.08, (n, 3)).astype(np.float32))
    cols = cols * (1 - f) + sc.haze_rgb * f
    _splat(sc, px, py, r, r, np.zeros(n), cols.astype(np.float32), _FLOWER)


def _paint_object(sc: _Scene, kind: int, x: float, y: float, mult: float = 1.0) -> None:
    if kind == _TREE:
        _tree(sc, x, y, mult)
    elif kind == _LUSH:
        _bush(sc, x, y, lush=True, mult=mult)
    elif kind == _DRYBUSH:
        _bush(sc, x, y, lush=False, mult=mult)
    elif kind == _ROCK:
        _rock(sc, x, y, mult)
    elif kind == _LOG:
        _log(sc, x, y, mult)
    elif kind == _FLOWER:
        _flowers(sc, x, y, mult)
    elif kind == _CLUTTER:
        # A little heap of debris around the point.
        n = int(sc.rng.integers(8, 16))
        g = max(sc.g_at(x, y), 1.0)
        pts = np.stack(
            [x + sc.rng.normal(0, 0.25, n) * g * mult, y + sc.rng.normal(0, 0.05, n) * g], 1
        )
        _clutter(sc, pts, mult * 1.4)


# ---------------------------------------------------------------------------------------------
# Scene layers


def _sky(sc: _Scene) -> None:
    rng = sc.rng
    top_y = int(np.ceil(sc.hor.max())) + 1
    tb, lb = rng.uniform(170, 215), rng.uniform(205, 232)
    top = np.array([tb - rng.uniform(85, 130), tb - rng.uniform(45, 75), tb], np.float32)
    low = np.array([lb - rng.uniform(12, 35), lb - rng.uniform(2, 18), lb], np.float32)
    t = (np.arange(top_y, dtype=np.float32) / max(float(sc.hor.mean()), 1.0)).clip(0, 1) ** 0.7
    grad = top[None, :] * (1 - t[:, None]) + low[None, :] * t[:, None]
    sky = sc.rgb[:, :top_y]
    sky[:] = grad.T[:, :, None]
    cloudiness = rng.uniform(0.0, 1.0)
    if cloudiness > 0.2:
        # Horizontally stretched cells: flat, drifting clouds.
        field = _value_noise(rng, top_y, sc.w, 9, 5) + 0.3 * sc.mid[:top_y]
        alpha = np.clip((field - rng.uniform(0.3, 1.3)) * 0.8, 0.0, 0.85) * cloudiness
        cloud = 236.0 - 12.0 * np.clip(field, -1.0, 2.0)
        sky += alpha[None] * (cloud[None] - sky)
    sc.cls[:top_y] = _SKY


def _sines(rng: np.random.Generator, x: np.ndarray, n: int, lo: float, hi: float) -> np.ndarray:
    """A smooth random 1-D profile of roughly unit amplitude: a sum of sines."""
    out = np.zeros_like(x)
    for _ in range(n):
        freq = rng.uniform(lo, hi)
        out += np.sin(2 * np.pi * freq * x + rng.uniform(0, 2 * np.pi)) / np.sqrt(freq / lo)
    return out / np.sqrt(n)


def _hills(sc: _Scene, land: np.ndarray) -> None:
    rng = sc.rng
    x = np.arange(sc.w, dtype=np.float32) / sc.w
    layers = int(rng.integers(1, 3))
    for i in range(layers):
        amp = sc.h * rng.uniform(0.03, 0.11) * (1.0 if i == 0 else 0.6)
        prof = np.clip(0.55 + 0.45 * _sines(rng, x, 4, 0.4, 3.0), 0.0, None)
        prof += 0.06 * _sines(rng, x, 3, 8.0, 25.0)
        ridge = sc.hor - amp * np.clip(prof, 0.05, None)
        y0 = max(0, int(np.floor(ridge.min())))
        y1 = int(np.ceil(sc.hor.max())) + 1
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        mask = (ys >= ridge[None, :]) & (ys <= sc.hor[None, :] + 1)
        f = 0.62 - 0.22 * i
        base = land * (0.9 + 0.1 * i) * (1 - f) + np.array([150, 160, 178], np.float32) * f
        depth = ((ys - ridge[None, :]) / np.maximum(sc.hor - ridge, 1.0)[None, :]).clip(0, 1)
        col = base[:, None, None] * (0.95 + 0.1 * depth[None])
        sc.paint((y0, y1, 0, sc.w), mask, _LAND, col)


def _ground(sc: _Scene, land: np.ndarray, grass: np.ndarray, coarse: np.ndarray) -> None:
    rng = sc.rng
    h, w = sc.h, sc.w
    y0 = max(0, int(np.floor(sc.hor.min())))
    ys = np.arange(y0, h, dtype=np.float32)[:, None]
    gmap = ys - sc.hor[None, :]
    ground = gmap > 0
    cz = coarse[y0:]
    factor = 1.0 + 0.1 * cz

    # An optional dirt track converging on a vanishing point on the horizon.
    road = None
    if rng.random() < 0.55:
        vx = w * rng.uniform(0.3, 0.7)
        bottom_x = w * rng.uniform(0.25, 0.75)
        hw = rng.uniform(0.25, 0.45) * (bottom_x if bottom_x < w / 2 else w - bottom_x) + 0.1 * w
        frac = np.clip(gmap / max(h - float(sc.hor.mean()), 1.0), 0.0, None)
        xc = vx + (bottom_x - vx) * frac
        half = hw * frac + 0.5
        across = np.abs(np.arange(w, dtype=np.float32)[None, :] - xc) / half
        road = ground & (across < 1.0 + 0.08 * sc.small[y0:])
        ruts = 1.0 - 0.12 * np.clip(1.0 - ((across - 0.5) / 0.15) ** 2, 0.0, None)
        ruts *= rng.uniform(1.03, 1.12)
        factor *= np.where(road, ruts, np.float32(1.0))

    # Dry grass patches: horizontally stretched noise blobs with jagged, blade-like edges.
    grass_field = _value_noise(rng, h - y0, w, max(2, (h - y0) // 22), max(3, w // 70))
    grass_field += 0.45 * sc.mid[y0:] + 0.35 * sc.streak[y0:]
    cover = rng.uniform(0.15, 0.4)
    free = ground if road is None else ground & ~road
    sample = grass_field[::4, ::4][free[::4, ::4]]
    thr = float(np.quantile(sample, 1.0 - cover)) if sample.size else 0.0
    patch = free & (grass_field > thr)
    cls = np.where(patch, np.uint8(_GRASS), np.uint8(_LAND))
    col = np.empty((3, *patch.shape), np.float32)
    for c in range(3):
        np.copyto(col[c], np.where(patch, np.float32(grass[c]), np.float32(land[c])))
    col[0] *= 1.0 + 0.04 * sc.mid[y0:]

    # Aerial perspective: far ground fades into the haze colour.
    # exp(-(y - hor) / L) = exp(-y / L) * exp(hor / L): an outer product, cheaper than exp.
    # (Values above the horizon are unused.)
    ey = np.exp(-(ys[:, 0].astype(np.float64) - y0) / sc.haze_len) * sc.haze_max
    ex = np.exp((sc.hor.astype(np.float64) - y0) / sc.haze_len)
    f = np.outer(ey.astype(np.float32), ex.astype(np.float32))
    col *= (factor * (1 - f))[None]
    col += f[None] * sc.haze_rgb[:, None, None]
    # Rows below the lowest horizon point are all ground: copy them without a mask.
    yb = min(h, int(np.floor(sc.hor.max())) + 1)
    np.copyto(sc.rgb[:, y0:yb], col[:, : yb - y0], where=ground[None, : yb - y0])
    np.copyto(sc.cls[y0:yb], cls[: yb - y0], where=ground[: yb - y0])
    sc.rgb[:, yb:] = col[:, yb - y0 :]
    sc.cls[yb:] = cls[yb - y0 :]


def _bottom(sc: _Scene) -> None:
    """Background: a vehicle hood (curved dark strip) or a thin dark unlabelled band."""
    rng = sc.rng
    h, w = sc.h, sc.w
    x = np.arange(w, dtype=np.float32)
    if rng.random() < 0.6:
        hh = h * rng.uniform(0.06, 0.12)
        xc = w * rng.uniform(0.35, 0.65)
        top = h - hh * (1.0 - 0.45 * ((x - xc) / (w * 0.6)) ** 2)
        y0 = int(np.floor(top.min()))
        ys = np.arange(y0, h, dtype=np.float32)[:, None]
        mask = ys >= top[None, :]
        d = (ys - top[None, :]) / hh
        base = np.array([30, 31, 35], np.float32) * rng.uniform(0.7, 1.4)
        glint = 70.0 * np.exp(-(((d - 0.12) / 0.05) ** 2)) * rng.uniform(0.4, 1.0)
        col = base[:, None, None] * (1.3 - 0.5 * d[None]) + glint[None]
        sc.paint((y0, h, 0, w), mask, _BG, col)
    else:
        rows = max(2, round(h * rng.uniform(0.012, 0.03)))
        y0 = h - rows
        col = np.array([9, 9, 10], np.float32) * rng.uniform(0.5, 1.5)
        sc.paint((y0, h, 0, w), np.ones((rows, w), bool), _BG, col)


# ---------------------------------------------------------------------------------------------
# Public API


def render_scene(seed: int, width: int = 960, height: int = 540) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB image and (H, W) uint16 mask of raw class codes; deterministic by seed.

    Every class of `ClassMap.default()` covers at least `min_class_pixels(width, height)` pixels.
    """
    _check_size(width, height)
    if seed < 0:
        raise ConfigError(f"synthetic data: seed {seed} is negative")
    rng = np.random.default_rng(seed)
    h, w = height, width

    # Noise fields shared by the layers (cell sizes scale with the image).
    px = h / 540  # one 540p pixel in this image's pixels
    mid = _value_noise(rng, h, w, 22, round(w / (24 * px)))
    cell = max(1.5, 4 * px)
    small = _value_noise(rng, h, w, round(h / cell), round(w / cell))
    fine = rng.standard_normal((h, w), dtype=np.float32)
    streak = _value_noise(rng, h, w, round(h / max(3, 10 * px)), round(w / max(1, 2 * px)))
    coarse = _value_noise(rng, h, w, 5, 9)

    xn = np.arange(w, dtype=np.float32) / w
    hor = (
        h * rng.uniform(0.3, 0.47)
        + h * rng.uniform(-0.06, 0.06) * (xn - 0.5)
        + h * 0.012 * _sines(rng, xn, 3, 1.0, 4.0)
    ).astype(np.float32)

    land = _LAND_COLORS[rng.integers(len(_LAND_COLORS))] * (
        1 + rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    )
    grass = _GRASS_COLORS[rng.integers(len(_GRASS_COLORS))] * (
        1 + rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    )
    sun = float(rng.uniform(-1, 1))
    sc = _Scene(
        rng=rng,
        h=h,
        w=w,
        cls=np.empty((h, w), np.uint8),
        rgb=np.empty((3, h, w), np.float32),
        hor=hor,
        ground_bottom=h * 0.88,
        mid=mid,
        small=small,
        fine=fine,
        streak=streak,
        sun=sun,
        shadow_dx=-np.sign(sun) * rng.uniform(0.3, 1.0),
        shadow_k=float(rng.uniform(0.55, 0.75)),
        haze_rgb=np.array(
            [rng.uniform(175, 205), rng.uniform(180, 205), rng.uniform(190, 215)], np.float32
        ),
        haze_max=float(rng.uniform(0.35, 0.65)),
        haze_len=float((h - hor.mean()) * rng.uniform(0.08, 0.16)),
    )

    _sky(sc)
    _hills(sc, land)
    _ground(sc, land, grass, coarse)

    # Clutter and flowers are low and small: painted first; objects then far to near.
    _clutter(sc, _ground_points(sc, int(rng.integers(80, 220)), 0.02, 1.0, 1.3))
    for bx, by in _ground_points(sc, int(rng.integers(3, 7)), 0.05, 0.95, 1.0):
        _flowers(sc, float(bx), float(by))
    objects: list[tuple[float, float, int]] = []
    for kind, lo, hi, t_lo, t_hi, power in (
        (_TREE, 2, 5, 0.04, 0.35, 1.3),
        (_LUSH, 3, 9, 0.02, 0.8, 1.5),
        (_DRYBUSH, 5, 13, 0.02, 0.9, 1.4),
        (_ROCK, 5, 14, 0.02, 1.0, 1.4),
        (_LOG, 2, 5, 0.05, 0.95, 1.2),
    ):
        n = int(rng.integers(lo, hi))
        pts = _ground_points(sc, n, t_lo, t_hi, power)
        objects.extend((float(y), float(x), kind) for x, y in pts)
    objects.sort(key=lambda o: o[0])
    for y, x, kind in objects:
        _paint_object(sc, kind, x, y)

    _bottom(sc)
    _ensure_classes(sc)

    # Per-class texture, black level, white balance, exposure and gamma.
    k = sc.cls
    tex = (
        1.0
        + _TEXTURE[k, 0] * mid
        + _TEXTURE[k, 1] * small
        + _TEXTURE[k, 2] * fine
        + _TEXTURE[k, 3] * streak
    )
    rgb = sc.rgb
    rgb *= tex[None]
    rgb += rng.normal(0.0, 1.5, 3).astype(np.float32)[:, None, None]  # black level
    img8 = np.clip(rgb, 0, 255).astype(np.uint8)
    gains = (1.0 + rng.normal(0.0, 0.035, 3)) * rng.uniform(0.82, 1.1)
    gamma = rng.uniform(0.85, 1.15)
    levels = np.arange(256, dtype=np.float64) / 255.0
    luts = np.clip(255.0 * (levels[None, :] ** gamma) * gains[:, None], 0, 255).astype(np.uint8)
    image = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        image[..., c] = luts[c][img8[c]]
    return image, _CODES[k]


def _ensure_classes(sc: _Scene) -> None:
    """Add foreground instances of any object class that ended up with too few pixels."""
    need = min_class_pixels(sc.w, sc.h)
    hor = float(sc.hor.mean())
    y_lo = int(hor + 0.45 * (sc.ground_bottom - hor))
    y_hi = int(sc.ground_bottom)
    for attempt in range(4):
        counts = np.bincount(sc.cls.ravel(), minlength=len(_CODES))
        missing = [k for k in range(len(_CODES)) if counts[k] < need]
        if not missing:
            return
        for k in missing:
            if k in (_BG, _SKY, _LAND):
                raise RuntimeError(f"synthetic scene: class {_NAMES[k]} has {counts[k]} pixels")
            # Stand the new object on a visible ground pixel in the lower part of the frame.
            band = sc.cls[y_lo:y_hi]
            ys, xs = np.nonzero((band == _LAND) | (band == _GRASS))
            if ys.size:
                i = int(sc.rng.integers(ys.size))
                x, y = float(xs[i]), float(ys[i] + y_lo)
            else:
                x = float(sc.rng.uniform(0.1, 0.9) * sc.w)
                y = float(sc.rng.uniform(y_lo, y_hi))
            # Size so the object stays within about a seventh of the width.
            g = max(sc.g_at(x, y), 1.0)
            width_scale = {_TREE: 1.0, _LOG: 1.4, _FLOWER: 0.6, _CLUTTER: 0.6}.get(k, 0.9)
            mult = min(1.0, (sc.w / 7) / (width_scale * g)) * (1.0 + 0.3 * attempt)
            _paint_object(sc, k, x, y, mult)
    counts = np.bincount(sc.cls.ravel(), minlength=len(_CODES))
    short = [f"{_NAMES[k]}={counts[k]}" for k in range(len(_CODES)) if counts[k] < need]
    if short:
        raise RuntimeError(f"synthetic scene: too few pixels for {', '.join(short)}")


def split_names(count: int, seed: int) -> list[str]:
    """The sorted file names `write_split(folder, count, seed)` writes: cc/mt/ww prefixes in
    turn with increasing, gapped frame numbers (cc0000012.png, mt0000031.png, ww10000007.png)."""
    if count < 0 or seed < 0:
        raise ConfigError(f"synthetic data: count {count} and seed {seed} must be >= 0")
    rng = np.random.default_rng([seed, _NAME_STREAM])
    names = []
    for i, (prefix, digits, offset) in enumerate(_PREFIXES):
        n = count // len(_PREFIXES) + (1 if i < count % len(_PREFIXES) else 0)
        start = int(rng.integers(0, 900_000))
        numbers = start + np.cumsum(rng.integers(1, 9, n))
        names.extend(f"{prefix}{offset + int(v):0{digits}d}.png" for v in numbers)
    return sorted(names)


def _scene_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def write_split(
    folder: Path, count: int, seed: int, width: int = 960, height: int = 540
) -> list[str]:
    """Writes folder/Color_Images/NAME.png (8-bit RGB) and folder/Segmentation/NAME.png (16-bit
    raw codes, via data.write_mask); returns the names in sorted order.

    Scene i (in name order) is `render_scene` of a seed derived from (seed, i). Files of the same
    names are overwritten; other PNGs already in those folders are an error (no mixed datasets).
    """
    _check_size(width, height)
    folder = Path(folder)
    names = split_names(count, seed)
    image_dir, mask_dir = folder / IMAGES_DIR, folder / MASKS_DIR
    for d in (image_dir, mask_dir):
        if d.is_dir():
            stale = sorted(p.name for p in d.glob("*.png") if p.name not in set(names))
            if stale:
                raise DataError(
                    f"{d}: holds {len(stale)} other PNG file(s) ({stale[0]}, ...); "
                    "write synthetic data into an empty folder"
                )
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        image, codes = render_scene(_scene_seed(seed, i), width, height)
        Image.fromarray(image).save(image_dir / name, compress_level=3)
        write_mask(mask_dir / name, codes)
    log.info("wrote %d synthetic scenes (%dx%d) to %s", len(names), width, height, folder)
    return names


def synthesize(config: SynthConfig) -> dict[str, list[str]]:
    """Writes both splits (train and val must use different seeds so their scenes differ);
    returns {"train": names, "val": names}.

    The split seeds are derived from `config.seed`; the val seed is chosen so that no val file
    name equals a train file name.
    """
    train_seed = _scene_seed(config.seed, 0)
    train_names = split_names(config.train, train_seed)
    val_seed = _scene_seed(config.seed, 1)
    while val_seed == train_seed or set(split_names(config.val, val_seed)) & set(train_names):
        val_seed = _scene_seed(val_seed, 1)
    out = config.out
    return {
        "train": write_split(out / "train", config.train, train_seed, config.width, config.height),
        "val": write_split(out / "val", config.val, val_seed, config.width, config.height),
    }
