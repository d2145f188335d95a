"""Objects standing on the ground, painted far to near: trees, bushes, rocks, logs, clutter,
flowers, with their shadows."""

from __future__ import annotations

import numpy as np

from offroad_seg.data.synthetic.canvas import _blob_union, _Scene
from offroad_seg.data.synthetic.palette import (
    _CANOPY_COLORS,
    _CLUTTER,
    _CLUTTER_COLORS,
    _DRYBUSH,
    _DRYBUSH_COLORS,
    _FLOWER,
    _FLOWER_COLORS,
    _FLOWER_LEAF,
    _LOG,
    _LOG_COLORS,
    _LUSH,
    _LUSH_COLORS,
    _ROCK,
    _ROCK_COLORS,
    _TREE,
    _TRUNK_COLORS,
)

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
