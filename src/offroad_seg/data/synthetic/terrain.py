"""The scene's layers: sky, hills, ground with grass and tracks, the vehicle's hood."""

from __future__ import annotations

import numpy as np

from offroad_seg.data.synthetic.canvas import _Scene, _value_noise
from offroad_seg.data.synthetic.palette import _BG, _GRASS, _LAND, _SKY

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
